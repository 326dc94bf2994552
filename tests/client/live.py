"""Live services for the client, CLI and web tests: own redis-server, API and Lanczos workers;
a stand-in worker that reports exact stages.

``shared_service`` starts a service the first time a session asks for it by name and keeps it
for the rest of the session, so the three test packages pay its start-up once.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from redis import Redis

from core.embedded_redis import EmbeddedRedis
from core.jobs import ImageFormat, ImageInfo, JobStatus
from core.records import JobStore
from tests.conftest import ServiceProcesses, start_service

IDLE_ENV = {
    # No worker, room for one queued job and a short Retry-After: 429 on demand.
    "SPASEMSR_API__MAX_QUEUE_DEPTH": "1",
    "SPASEMSR_API__RETRY_AFTER_SECONDS": "1",
}

_RUNNING: dict[str, ServiceProcesses] = {}


@contextmanager
def live_service(*, workers: int = 1, **env: str) -> Iterator[ServiceProcesses]:
    """Real processes as in production; a short temporary folder keeps the socket path short."""
    directory = Path(tempfile.mkdtemp(prefix="ssr-live-"))
    redis = EmbeddedRedis(directory / "redis", appendonly=False).start()
    try:
        service = start_service(
            redis.url,
            directory,
            workers=workers,
            SPASEMSR_WORKER__MODELS='["lanczos"]',
            SPASEMSR_MODEL__DEFAULT="lanczos",
            **env,
        )
        try:
            yield service
        finally:
            service.stop()
    finally:
        redis.stop()
        shutil.rmtree(directory, ignore_errors=True)


def shared_service(
    request: pytest.FixtureRequest, name: str, *, workers: int = 1, **env: str
) -> ServiceProcesses:
    """The session's service called ``name``; call only from session-scoped fixtures."""
    if name not in _RUNNING:
        stack = ExitStack()
        _RUNNING[name] = stack.enter_context(live_service(workers=workers, **env))

        def stop() -> None:
            _RUNNING.pop(name, None)
            stack.close()

        request.addfinalizer(stop)
    return _RUNNING[name]


# The steps a stand-in worker reports: (stage, step, total).
STAGES = [("denoise", 1, 3), ("denoise", 2, 3), ("denoise", 3, 3), ("write", 0, 1)]
SIGHTING_SECONDS = 60.0
"""A generous bound on how long one step may take to reach the client."""


class StandInWorker:
    """Moves a queued job through ``STAGES`` to succeeded, a step after each sighting."""

    def __init__(self, service: ServiceProcesses, job_id: str) -> None:
        self._store = JobStore(
            Redis.from_url(service.env["SPASEMSR_REDIS__URL"]), prefix="spasemsr", ttl_seconds=600
        )
        self._job_id = job_id
        self._seen = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.failure: BaseException | None = None

    def saw(self, *_: object) -> None:
        """Called by the client's progress handler: each distinct state it was shown lets
        the next step happen."""
        self._seen.release()

    def __enter__(self) -> StandInWorker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(timeout=SIGHTING_SECONDS)

    def _step(self) -> None:
        if not self._seen.acquire(timeout=SIGHTING_SECONDS):
            raise TimeoutError("the client never saw the previous step")

    def _run(self) -> None:
        try:
            self._step()  # queued
            moved = self._store.transition(
                self._job_id, from_statuses=[JobStatus.QUEUED], to=JobStatus.PROCESSING
            )
            assert moved
            for stage, step, total in STAGES:
                self._step()
                self._store.update(
                    self._job_id, progress={"stage": stage, "step": step, "total": total}
                )
            self._step()
            output = ImageInfo(width=48, height=32, format=ImageFormat.PNG, bytes=10)
            self._store.transition(
                self._job_id,
                from_statuses=[JobStatus.PROCESSING],
                to=JobStatus.SUCCEEDED,
                output=output,
                progress={"stage": "succeeded", "step": 0, "total": 0},
            )
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.failure = exc
