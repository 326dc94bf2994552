"""``SpaSemSRClient`` against live services (real uvicorn, Redis and worker processes)."""

from __future__ import annotations

import io
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest
from PIL import Image
from spasemsr_client import (
    JobStatus,
    Overloaded,
    RetryPolicy,
    ServiceUnavailable,
    ServiceUnreachable,
    SpaSemSRClient,
    WaitTimeout,
)
from spasemsr_client._common import parse_retry_after
from spasemsr_client.errors import (
    InvalidParameters,
    JobAlreadyFinished,
    JobCanceled,
    JobNotFinished,
    JobNotFound,
    UnsupportedImage,
)
from spasemsr_client.models import Job

from tests.conftest import ServiceProcesses, free_port, png_bytes


def test_submit_wait_with_progress_and_download(service: ServiceProcesses, tmp_path: Path) -> None:
    source = tmp_path / "photo.png"
    source.write_bytes(png_bytes(24, 16))
    seen: list[Job] = []
    with SpaSemSRClient(service.url) as client:
        job = client.submit(source, scale=2, steps=3, seed=5, tags=["sky", "sea"])
        assert job.status is JobStatus.QUEUED
        assert job.parameters["tags"] == ["sky", "sea"]
        finished = client.wait(job.id, on_progress=seen.append, poll_interval=0.05)
        saved = client.download(job.id, tmp_path / "out.png")
        data = client.result(job.id)
    assert finished.status is JobStatus.SUCCEEDED
    assert finished.output is not None and (finished.output.width, finished.output.height) == (
        48,
        32,
    )
    assert finished.started_at is not None and finished.finished_at is not None
    assert seen[-1].status is JobStatus.SUCCEEDED
    assert len({(j.status, j.progress.stage, j.progress.step) for j in seen}) == len(seen)
    assert saved.read_bytes() == data
    assert Image.open(io.BytesIO(data)).size == (48, 32)
    assert not (tmp_path / "out.png.part").exists()


def test_model_description_is_typed(service: ServiceProcesses) -> None:
    with SpaSemSRClient(service.url) as client:
        model = client.model()
        assert client.ready().status == "ok"
    assert model.name == "lanczos"
    assert model.trained is True
    assert model.workers == 1
    assert model.warnings == []


def test_problem_answers_become_typed_errors(service: ServiceProcesses) -> None:
    with SpaSemSRClient(service.url) as client:
        with pytest.raises(UnsupportedImage) as refused:
            client.submit(b"certainly not an image", filename="x.png")
        assert refused.value.status_code == 415
        assert refused.value.title == "Unsupported image format"
        with pytest.raises(InvalidParameters) as invalid:
            client.submit(png_bytes(), filename="a.png", steps=0)
        assert invalid.value.status_code == 422
        assert "steps" in invalid.value.detail
        with pytest.raises(JobNotFound):
            client.get("0" * 32)
        done = client.wait(client.submit(png_bytes(), filename="a.png", scale=2).id)
        with pytest.raises(JobAlreadyFinished) as finished:
            client.cancel(done.id)
        assert finished.value.status_code == 409


def test_queued_job_cancel_result_and_wait_timeout(idle_service: ServiceProcesses) -> None:
    with SpaSemSRClient(idle_service.url) as client:
        job = client.submit(png_bytes(), filename="a.png")
        try:
            with pytest.raises(JobNotFinished):
                client.result(job.id)
            began = time.monotonic()
            with pytest.raises(WaitTimeout):
                client.wait(job.id, timeout=0.3, poll_interval=0.05)
            assert time.monotonic() - began < 3
            assert client.get(job.id).queue_position == 0
        finally:
            canceled = client.cancel(job.id)
        assert canceled.status is JobStatus.CANCELED
        with pytest.raises(JobCanceled) as ended:
            client.wait(job.id)
        assert ended.value.job.id == job.id
        assert client.wait(job.id, raise_on_failure=False).status is JobStatus.CANCELED


def test_no_warm_worker_is_a_typed_503(idle_service: ServiceProcesses) -> None:
    with SpaSemSRClient(idle_service.url, retry=RetryPolicy(retries=0)) as client:
        with pytest.raises(ServiceUnavailable) as unavailable:
            client.model()
        assert unavailable.value.status_code == 503
        with pytest.raises(ServiceUnavailable):
            client.ready()


def test_full_queue_429_is_retried_after_retry_after(idle_service: ServiceProcesses) -> None:
    with SpaSemSRClient(idle_service.url, retry=RetryPolicy(retries=0)) as client:
        blocker = client.submit(png_bytes(), filename="a.png")
        try:
            with pytest.raises(Overloaded) as full:
                client.submit(png_bytes(), filename="b.png")
            assert full.value.status_code == 429
            assert full.value.retry_after == 1.0
            assert full.value.title == "Service overloaded"
        except BaseException:
            client.cancel(blocker.id)
            raise

    # The queue frees up while the client waits out Retry-After; the retry then succeeds.
    releaser = threading.Timer(0.3, lambda: SpaSemSRClient(idle_service.url).cancel(blocker.id))
    with SpaSemSRClient(idle_service.url, retry=RetryPolicy(retries=3)) as client:
        began = time.monotonic()
        releaser.start()
        accepted = client.submit(png_bytes(), filename="b.png")
        waited = time.monotonic() - began
        client.cancel(accepted.id)
    assert accepted.status is JobStatus.QUEUED
    assert 0.9 <= waited < 5, waited


class CountingTransport(httpx.HTTPTransport):
    """The real transport, counting the requests that go through it."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        return super().handle_request(request)


def test_retry_after_longer_than_max_wait_is_not_slept(idle_service: ServiceProcesses) -> None:
    policy = RetryPolicy(retries=5, max_wait=0.5)  # the idle service says Retry-After: 1
    transport = CountingTransport()
    with SpaSemSRClient(idle_service.url, retry=policy, transport=transport) as client:
        blocker = client.submit(png_bytes(), filename="a.png")
        try:
            with pytest.raises(Overloaded):
                client.submit(png_bytes(), filename="b.png")
            # Counted, not timed: the refused upload was sent once, not retried after a wait.
            assert transport.requests.count("POST /v1/jobs") == 2
        finally:
            client.cancel(blocker.id)


def test_unreachable_service_and_request_timeout() -> None:
    with (
        SpaSemSRClient(f"http://127.0.0.1:{free_port()}", timeout=2) as client,
        pytest.raises(ServiceUnreachable) as unreachable,
    ):
        client.health()
    assert "cannot reach" in str(unreachable.value)
    # A server that accepts the connection and never answers: the request timeout ends it.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        began = time.monotonic()
        with SpaSemSRClient(url, timeout=0.3) as client, pytest.raises(ServiceUnreachable):
            client.get("0" * 32)
        assert time.monotonic() - began < 3


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("7") == 7.0
    later = format_datetime(now + timedelta(seconds=90), usegmt=True)
    earlier = format_datetime(now - timedelta(seconds=5), usegmt=True)
    assert parse_retry_after(later, now=now) == 90
    assert parse_retry_after(earlier, now=now) == 0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    policy = RetryPolicy(retries=2, backoff=0.5, max_wait=10)
    assert [policy.delay(a, None) for a in range(3)] == [0.5, 1.0, None]
    assert policy.delay(0, 30) is None  # longer than max_wait: the caller decides
