"""A storage outage holds jobs back instead of failing them.

With real parts: a redis-server, the API and a worker as OS processes, local storage whose
folder is swapped for a regular file (unusable even for root), and moto's S3 server stopped
and started again on its port. Uploads during an outage get 503; accepted jobs wait off the
worker (no attempt counted) and all succeed once storage is back. In-process with the real
job runner and recovery: a job whose deadline passes while storage stays down ends with the
storage error, and a missing input still fails at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TypedDict, Unpack, cast

import httpx
import pytest
from redis import Redis

from core.embedded_redis import EmbeddedRedis
from core.jobs import (
    ImageFormat,
    ImageInfo,
    JobParameters,
    JobPayload,
    JobRecord,
    JobStatus,
    Priority,
    input_key_for,
    new_job_id,
    output_key_for,
    payload_for,
    utcnow,
)
from core.models import ModelName
from core.redis_conn import text
from core.settings import Settings
from tests.conftest import ServiceProcesses, free_port, png_bytes, start_service, wait_for_status
from tests.core.test_storage import replaced_by_a_file
from tests.worker.runtimes import in_process_runtime
from worker.runtime import WorkerRuntime
from worker.tasks import JobRunner

# Short in-process retries (two tries, 0.2 s apart), so that an outage of a few seconds
# outlasts them and exercises the hand-back; waits off the worker of 0.5, 1, 2, 2... s.
SHORT_RETRIES = {
    "SPASEMSR_WORKER__MODELS": '["lanczos"]',
    "SPASEMSR_MODEL__DEFAULT": "lanczos",
    "SPASEMSR_WORKER__HEARTBEAT_SECONDS": "0.5",
    "SPASEMSR_WORKER__RETRY_BACKOFF_SECONDS": "0.5",
    "SPASEMSR_WORKER__STORAGE_RETRY_ATTEMPTS": "2",
    "SPASEMSR_WORKER__STORAGE_RETRY_FIRST_WAIT_SECONDS": "0.2",
    "SPASEMSR_WORKER__STORAGE_WAIT_MAX_SECONDS": "2",
    "SPASEMSR_API__RATE_LIMIT_PER_MINUTE": "0",
}
ENDED = {"succeeded", "failed", "canceled"}


def _submit(client: httpx.Client) -> str:
    files = {"image": ("a.png", png_bytes(), "image/png")}
    response = client.post("/v1/jobs", files=files, data={"scale": "2"})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _assert_unavailable(client: httpx.Client) -> httpx.Response:
    """An upload while storage is down: 503 problem+json (not 500)."""
    files = {"image": ("a.png", png_bytes(), "image/png")}
    response = client.post("/v1/jobs", files=files, data={"scale": "2"})
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["title"] == "Object storage unavailable"
    return response


def _records(redis_url: str, ids: list[str]) -> list[dict[str, object]]:
    connection = Redis.from_url(redis_url)
    raws = [connection.hgetall(f"spasemsr:job:{job_id}") for job_id in ids]
    return [{text(k): json.loads(v) for k, v in raw.items()} for raw in raws]


@contextmanager
def paused(process: subprocess.Popen[bytes]) -> Iterator[None]:
    """Stop the worker while jobs are queued, so that every job meets the outage."""
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


@contextmanager
def running_service(redis_url: str, tmp_path: Path, **env: str) -> Iterator[ServiceProcesses]:
    service = start_service(redis_url, tmp_path, workers=1, **SHORT_RETRIES, **env)
    try:
        yield service
    finally:
        service.stop()


def _assert_all_succeeded_uncounted(client: httpx.Client, redis_url: str, ids: list[str]) -> None:
    finished = [wait_for_status(client, job_id, ENDED, timeout=60) for job_id in ids]
    assert [job["status"] for job in finished] == ["succeeded"] * len(ids), finished
    records = _records(redis_url, ids)
    assert [record["attempts"] for record in records] == [1] * len(ids)  # waits are no attempt
    waits = [int(str(record.get("storage_waits", 0))) for record in records]
    assert sum(waits) >= 1, waits  # the outage outlasted the in-process retries
    connection = Redis.from_url(redis_url)
    assert connection.hlen("spasemsr:running") == 0
    assert connection.zcard("spasemsr:delayed") == 0


def test_local_storage_outage_holds_jobs_until_it_is_back(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    redis_url = redis_server.url
    root = tmp_path / "var" / "storage"
    with (
        running_service(redis_url, tmp_path) as service,
        httpx.Client(base_url=service.url, timeout=30) as client,
    ):
        with ExitStack() as outage:
            with paused(service.workers[0]):
                ids = [_submit(client) for _ in range(12)]
                outage.enter_context(replaced_by_a_file(root))
            # The worker runs on: it tries each job, then holds it back.
            _assert_unavailable(client)
            time.sleep(6)
            _assert_unavailable(client)
        _assert_all_succeeded_uncounted(client, redis_url, ids)
        assert len(list((root / "results").glob("*.png"))) == 12
        assert not list((root / "inputs").glob("*"))  # inputs dropped once done


def test_s3_outage_longer_than_the_retries_fails_no_job(
    redis_server: EmbeddedRedis, tmp_path: Path, s3_env: dict[str, str]
) -> None:
    from moto.server import ThreadedMotoServer

    redis_url = redis_server.url
    # A private S3 server on its own port. moto keeps its buckets in this process, so the
    # server stopped and started again on the same port serves the same objects: an outage
    # (connections refused) and not a data loss.
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {**s3_env, "SPASEMSR_STORAGE__S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        with (
            running_service(redis_url, tmp_path, **env) as service,
            httpx.Client(base_url=service.url, timeout=60) as client,
        ):
            with paused(service.workers[0]):
                ids = [_submit(client) for _ in range(8)]
                server.stop()
            _assert_unavailable(client)
            time.sleep(12)  # many times what the in-process retries cover
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
            _assert_all_succeeded_uncounted(client, redis_url, ids)
            assert all(client.get(f"/v1/jobs/{i}/result").status_code == 200 for i in ids)
    finally:
        server.stop()


def test_an_upload_during_a_storage_outage_says_when_to_retry(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    service = start_service(redis_server.url, tmp_path, workers=0, **SHORT_RETRIES)
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            with replaced_by_a_file(tmp_path / "var" / "storage"):
                response = _assert_unavailable(client)
            assert int(response.headers["retry-after"]) > 0
    finally:
        service.stop()


# In-process: the real job runner and recovery against a real Redis and local storage.


class _WorkerOverrides(TypedDict, total=False):
    """The worker settings these tests shorten (names and types as in ``WorkerSettings``)."""

    queue_ttl_seconds: float
    retry_backoff_seconds: float
    storage_retry_attempts: int
    storage_retry_first_wait_seconds: float


def _runtime(
    settings: Settings, tmp_path: Path, **worker: Unpack[_WorkerOverrides]
) -> WorkerRuntime:
    return in_process_runtime(settings, tmp_path / "storage", **worker)


def _accept(runtime: WorkerRuntime) -> JobPayload:
    job_id = new_job_id()
    data = png_bytes()
    parameters = JobParameters(model=ModelName.LANCZOS, scale=2)
    info = ImageInfo(width=24, height=16, format=ImageFormat.PNG, bytes=len(data))
    record = JobRecord(
        id=job_id, status=JobStatus.QUEUED, priority=Priority.DEFAULT, parameters=parameters,
        input=info, input_key=input_key_for(job_id),
        output_key=output_key_for(job_id, parameters.output_format), created_at=utcnow(),
    )  # fmt: skip
    runtime.storage.put(record.input_key, data, content_type="image/png")
    runtime.jobs.create(record)
    return payload_for(record)


def _delayed(runtime: WorkerRuntime) -> dict[str, float]:
    connection = Redis.from_url(runtime.settings.redis.url or "")
    entries = cast(
        "list[tuple[bytes, float]]", connection.zrange("spasemsr:delayed", 0, -1, withscores=True)
    )
    return {text(member): float(score) for member, score in entries}


def _queued_entries(runtime: WorkerRuntime) -> int:
    assert runtime.queue is not None
    return runtime.queue.depths()[(ModelName.LANCZOS, Priority.DEFAULT)]


def _take(runtime: WorkerRuntime, job_id: str) -> JobPayload:
    """What a worker does with a released job: take its entry off the queue and run it."""
    assert runtime.queue is not None
    entry = runtime.queue.queue(ModelName.LANCZOS, Priority.DEFAULT).pop_job_id()
    assert entry is not None and entry.startswith(job_id)
    return payload_for(runtime.jobs.get(job_id))


def test_a_job_held_back_past_its_deadline_ends_with_the_storage_error(
    settings: Settings, tmp_path: Path
) -> None:
    runtime = _runtime(
        settings, tmp_path, queue_ttl_seconds=2.0, retry_backoff_seconds=0.5,
        storage_retry_attempts=1,
    )  # fmt: skip
    assert runtime.recovery is not None
    payload = _accept(runtime)
    deadline = time.time() + 2.0
    with replaced_by_a_file(tmp_path / "storage"):
        assert JobRunner(runtime, payload).run() == {"status": "requeued"}
        record = runtime.jobs.get(payload.job_id)
        assert record.status is JobStatus.QUEUED and record.error is None
        assert (record.attempts, record.storage_waits) == (0, 1)
        assert record.progress.stage == "waiting-for-storage"
        assert payload.job_id in _delayed(runtime) and _queued_entries(runtime) == 0
        # Storage stays down: each time the backoff is over the job is tried and held again,
        # never later than its deadline, until the deadline has passed.
        for _ in range(20):
            due = _delayed(runtime).get(payload.job_id)
            assert due is not None and due <= deadline + 0.01
            time.sleep(max(0.0, due - time.time()))
            assert runtime.recovery.release_due() == [payload.job_id]
            # Past the deadline the job is failed at pickup ("skipped": it is no longer
            # queued) or, when the deadline passes during the tries, at the hand-back.
            outcome = JobRunner(runtime, _take(runtime, payload.job_id)).run()
            assert outcome["status"] in {"requeued", "failed", "skipped"}
            record = runtime.jobs.get(payload.job_id)
            if record.status is JobStatus.FAILED:
                break
    assert record.status is JobStatus.FAILED and record.error is not None
    assert record.error.type == "storage-unavailable"
    assert "unavailable until the job's deadline" in record.error.detail
    assert record.storage_waits >= 2
    assert _queued_entries(runtime) == 0 and not _delayed(runtime)
    assert not runtime.recovery.running()


def test_a_deadline_that_passes_during_the_retries_fails_at_once(
    settings: Settings, tmp_path: Path
) -> None:
    runtime = _runtime(
        settings, tmp_path, queue_ttl_seconds=0.5, storage_retry_attempts=2,
        storage_retry_first_wait_seconds=0.8,
    )  # fmt: skip
    payload = _accept(runtime)
    with replaced_by_a_file(tmp_path / "storage"):
        assert JobRunner(runtime, payload).run() == {"status": "failed"}
    record = runtime.jobs.get(payload.job_id)
    assert record.error is not None and record.error.type == "storage-unavailable"
    assert record.attempts == 1 and not _delayed(runtime) and _queued_entries(runtime) == 0
    assert runtime.recovery is not None and not runtime.recovery.running()


def test_storage_back_before_the_deadline_runs_the_held_job(
    settings: Settings, tmp_path: Path
) -> None:
    runtime = _runtime(settings, tmp_path, retry_backoff_seconds=0, storage_retry_attempts=1)
    assert runtime.recovery is not None
    payload = _accept(runtime)
    with replaced_by_a_file(tmp_path / "storage"):
        assert JobRunner(runtime, payload).run() == {"status": "requeued"}
    time.sleep(max(0.0, _delayed(runtime)[payload.job_id] - time.time()))
    assert runtime.recovery.release_due() == [payload.job_id]
    assert JobRunner(runtime, _take(runtime, payload.job_id)).run() == {"status": "succeeded"}
    record = runtime.jobs.get(payload.job_id)
    assert (record.attempts, record.storage_waits, record.error) == (1, 1, None)
    assert runtime.storage.exists(record.output_key)


def test_a_missing_input_still_fails_at_once(settings: Settings, tmp_path: Path) -> None:
    runtime = _runtime(settings, tmp_path, storage_retry_attempts=5)
    payload = _accept(runtime)
    runtime.storage.delete(payload.input_key)
    began = time.monotonic()
    assert JobRunner(runtime, payload).run() == {"status": "failed"}
    assert time.monotonic() - began < 5  # not retried as if storage were down (5 tries: 7.5 s)
    record = runtime.jobs.get(payload.job_id)
    assert record.error is not None and record.error.type == "input-missing"
    assert record.storage_waits == 0 and not _delayed(runtime)


@pytest.mark.parametrize("waits", [0, 1, 3, 10, 5000])
def test_storage_waits_double_and_are_capped(waits: int) -> None:
    from core.recovery import storage_wait_seconds

    wait = storage_wait_seconds(waits, first_seconds=2.0, max_seconds=60.0)
    assert wait == min(60.0, 2.0 * 2 ** min(waits, 32))
    assert storage_wait_seconds(0, first_seconds=0.0, max_seconds=60.0) > 0  # never a busy loop
