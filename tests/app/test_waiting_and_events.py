"""`Prefer: wait` on job creation, live progress as Server-Sent Events, and absolute links, on
real API and worker processes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from app.waiting import requested_wait
from tests.client.live import live_service
from tests.conftest import ServiceProcesses, png_bytes


@pytest.fixture(scope="module")
def service() -> Iterator[ServiceProcesses]:
    with live_service(workers=1, SPASEMSR_API__MAX_PREFER_WAIT_SECONDS="30") as running:
        yield running


@pytest.fixture(scope="module")
def idle() -> Iterator[ServiceProcesses]:
    with live_service(workers=0, SPASEMSR_API__PUBLIC_URL="https://sr.example.org/") as running:
        yield running


def _upload(client: httpx.Client, **headers: str) -> httpx.Response:
    files = {"image": ("a.png", png_bytes(), "image/png")}
    return client.post("/v1/jobs", files=files, data={"scale": "2"}, headers=headers)


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("", None), ("respond-async", None), ("wait", 30.0), ("wait=5", 5.0),
     ("wait=600", 30.0), ("respond-async, wait=2", 2.0), ("waiting=3", None)],
)  # fmt: skip
def test_the_prefer_header_is_read_as_rfc_7240_writes_it(
    header: str | None, expected: float | None
) -> None:
    assert requested_wait(header, max_seconds=30) == expected


def test_prefer_wait_answers_with_the_finished_job(service: ServiceProcesses) -> None:
    with httpx.Client(base_url=service.url, timeout=60) as client:
        response = _upload(client, Prefer="wait")
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded"
    assert response.headers["preference-applied"] == "wait=30"
    assert job["links"]["result"] == f"{service.url}/v1/jobs/{job['id']}/result"
    assert response.headers["location"] == f"{service.url}/v1/jobs/{job['id']}"


def test_a_wait_that_runs_out_answers_with_the_job_as_it_stands(idle: ServiceProcesses) -> None:
    with httpx.Client(base_url=idle.url, timeout=60) as client:
        response = _upload(client, Prefer="wait=1")
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["status"] == "queued"
        # Behind a proxy the links use the configured public URL, not the address asked.
        assert job["links"]["self"] == f"https://sr.example.org/v1/jobs/{job['id']}"
        client.delete(f"/v1/jobs/{job['id']}")


def test_events_stream_the_job_until_it_ends(service: ServiceProcesses) -> None:
    with httpx.Client(base_url=service.url, timeout=60) as client:
        job_id = _upload(client).json()["id"]
        seen: list[dict[str, object]] = []
        deadline = time.monotonic() + 60
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                assert time.monotonic() < deadline
                if line.startswith("data: "):
                    seen.append(json.loads(line.removeprefix("data: ")))
    assert seen, "no event"
    assert seen[-1]["status"] == "succeeded"  # the stream ended with the job
    order = ["queued", "processing", "succeeded"]
    statuses = [order.index(str(event["status"])) for event in seen]
    assert statuses == sorted(statuses)
    assert len({json.dumps(event, sort_keys=True) for event in seen}) == len(seen)  # changes only


def test_events_of_an_unknown_job_are_a_404(service: ServiceProcesses) -> None:
    with httpx.Client(base_url=service.url, timeout=30) as client:
        response = client.get("/v1/jobs/" + "0" * 32 + "/events")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
