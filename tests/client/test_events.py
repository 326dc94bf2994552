"""``wait`` and ``events`` follow a job through ``GET /v1/jobs/{id}/events`` (Server-Sent
Events) against live services; polling is only the fallback of a service without the stream.

Where a test needs a worker that reports exact stages, a stand-in moves the job's record on
in the service's real Redis (as a worker does), one step each time the client has seen the
previous one: no state can be missed, whatever the machine's speed. The transports below are
real HTTP transports that count requests, or cut a stream or refuse the events route to act
as a broken network or an older service.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from spasemsr_client import AsyncSpaSemSRClient, JobStatus, SpaSemSRClient, WaitTimeout
from spasemsr_client._common import EventParser, ServerSentEvent
from spasemsr_client.models import Job

from tests.client.live import SIGHTING_SECONDS, STAGES, StandInWorker
from tests.conftest import ServiceProcesses, png_bytes


class Counting(httpx.HTTPTransport):
    """A real transport that records ``(method, path)`` of every request."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path))
        return super().handle_request(request)

    def count(self, method: str, path: str) -> int:
        return self.requests.count((method, path))


class _CutAfterFirstEvent(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream) -> None:
        self._inner = inner

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            yield chunk
            if b"\n\n" in chunk:
                raise httpx.ReadError("connection reset (injected)")

    def close(self) -> None:
        self._inner.close()


class CutsTheFirstStream(Counting):
    """The first event stream breaks after its first event, as a dropped connection does."""

    cut = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.url.path.endswith("/events") and not self.cut:
            self.cut = True
            assert isinstance(response.stream, httpx.SyncByteStream)
            return httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=_CutAfterFirstEvent(response.stream),
                request=request,
            )
        return response


class WithoutEvents(Counting):
    """A service that predates the events route: 404 problem+json for it."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            self.requests.append((request.method, request.url.path))
            problem = {"type": "about:blank", "title": "Not Found", "status": 404, "detail": ""}
            return httpx.Response(404, json=problem, request=request)
        return super().handle_request(request)


def _stages(seen: list[Job]) -> list[tuple[str, int, int]]:
    return [
        (j.progress.stage, j.progress.step, j.progress.total)
        for j in seen
        if j.status is JobStatus.PROCESSING
    ]


def test_wait_follows_the_event_stream_through_every_stage(
    idle_service: ServiceProcesses,
) -> None:
    transport = Counting()
    seen: list[Job] = []
    with SpaSemSRClient(idle_service.url, transport=transport) as client:
        job = client.submit(png_bytes(), filename="a.png", scale=2)
        with StandInWorker(idle_service, job.id) as worker:

            def progress(j: Job) -> None:
                seen.append(j)
                worker.saw(j)

            finished = client.wait(job.id, on_progress=progress, timeout=SIGHTING_SECONDS * 8)
    assert worker.failure is None, worker.failure
    assert finished.status is JobStatus.SUCCEEDED and finished.id == job.id
    assert seen[0].status is JobStatus.QUEUED and seen[0].queue_position == 0
    assert _stages(seen)[-len(STAGES) :] == STAGES
    assert seen[-1] == finished
    # One stream carried it all: the job was never polled.
    assert transport.count("GET", f"/v1/jobs/{job.id}/events") == 1
    assert transport.count("GET", f"/v1/jobs/{job.id}") == 0


def test_events_yield_each_change_and_end_with_the_final_job(service: ServiceProcesses) -> None:
    transport = Counting()
    with SpaSemSRClient(service.url, transport=transport) as client:
        job = client.submit(png_bytes(), filename="a.png", scale=2)
        states = list(client.events(job.id, timeout=SIGHTING_SECONDS))
    assert states[-1].status is JobStatus.SUCCEEDED
    assert all(not j.is_terminal for j in states[:-1])
    assert all(a != b for a, b in itertools.pairwise(states))
    assert transport.count("GET", f"/v1/jobs/{job.id}") == 0


def test_a_broken_stream_is_followed_again_after_one_get(idle_service: ServiceProcesses) -> None:
    transport = CutsTheFirstStream()
    seen: list[Job] = []
    with SpaSemSRClient(idle_service.url, transport=transport) as client:
        job = client.submit(png_bytes(), filename="a.png", scale=2)
        with StandInWorker(idle_service, job.id) as worker:

            def progress(j: Job) -> None:
                seen.append(j)
                worker.saw(j)

            finished = client.wait(
                job.id, on_progress=progress, timeout=SIGHTING_SECONDS * 8, poll_interval=0.05
            )
    assert worker.failure is None, worker.failure
    assert finished.status is JobStatus.SUCCEEDED
    assert _stages(seen)[-len(STAGES) :] == STAGES
    assert transport.count("GET", f"/v1/jobs/{job.id}/events") == 2
    assert transport.count("GET", f"/v1/jobs/{job.id}") == 1


def test_a_service_without_the_stream_is_polled(service: ServiceProcesses) -> None:
    transport = WithoutEvents()
    with SpaSemSRClient(service.url, transport=transport) as client:
        job = client.submit(png_bytes(), filename="a.png", scale=2)
        finished = client.wait(job.id, timeout=SIGHTING_SECONDS, poll_interval=0.05)
    assert finished.status is JobStatus.SUCCEEDED
    assert transport.count("GET", f"/v1/jobs/{job.id}/events") == 1  # asked once, then polled
    assert transport.count("GET", f"/v1/jobs/{job.id}") >= 1


def test_a_quiet_stream_still_ends_at_the_timeout(idle_service: ServiceProcesses) -> None:
    with SpaSemSRClient(idle_service.url) as client:
        job = client.submit(png_bytes(), filename="a.png")
        states: list[Job] = []
        with pytest.raises(WaitTimeout):
            for state in client.events(job.id, timeout=0.5):
                states.append(state)
        client.cancel(job.id)
    assert [s.status for s in states] == [JobStatus.QUEUED]


def test_the_async_client_follows_the_stream_too(idle_service: ServiceProcesses) -> None:
    seen: list[Job] = []

    async def main(worker: StandInWorker, job_id: str) -> Job:
        async def progress(j: Job) -> None:
            seen.append(j)
            worker.saw(j)

        async with AsyncSpaSemSRClient(idle_service.url) as client:
            return await client.wait(job_id, on_progress=progress, timeout=SIGHTING_SECONDS * 8)

    with SpaSemSRClient(idle_service.url) as sync_client:
        job = sync_client.submit(png_bytes(), filename="a.png", scale=2)
    with StandInWorker(idle_service, job.id) as worker:
        finished = asyncio.run(main(worker, job.id))
    assert worker.failure is None, worker.failure
    assert finished.status is JobStatus.SUCCEEDED
    assert _stages(seen)[-len(STAGES) :] == STAGES


def _events(lines: list[str]) -> list[ServerSentEvent]:
    parser = EventParser()
    found = [parser.feed(line) for line in lines]
    return [event for event in found if event is not None]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["event: job", "data: {}", ""], [ServerSentEvent("job", "{}")]),
        ([": still there", "", "data:a", "data: b", ""], [ServerSentEvent("message", "a\nb")]),
        (
            ["event: job", "", "data: x", "id: 1", "retry: 10", ""],
            [ServerSentEvent("message", "x")],
        ),
        (["data: unfinished"], []),
    ],
)
def test_the_event_stream_format(lines: list[str], expected: list[Any]) -> None:
    assert _events(lines) == expected
