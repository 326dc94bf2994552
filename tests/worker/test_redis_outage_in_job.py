"""Redis lost in the middle of a job (a progress update fails): the runner waits for Redis,
then hands the job back uncounted; it is neither failed nor left `processing` forever. Lost
just as the job is marked processing: the worker's loop hands it back once Redis returns."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from core.embedded_redis import EmbeddedRedis
from core.jobs import JobStatus
from core.redis_conn import wait_for_redis
from core.settings import Settings
from model.upscalers.lanczos import LanczosUpscaler
from tests.worker.runtimes import in_process_runtime
from tests.worker.test_storage_outage import _accept
from worker.main import hand_back_held_jobs
from worker.tasks import JobRunner


@pytest.fixture
def aof_settings(tmp_path: Path) -> Iterator[tuple[Settings, EmbeddedRedis]]:
    directory = Path(tempfile.mkdtemp(prefix="ssr-rj-"))
    server = EmbeddedRedis(directory, appendonly=True).start()
    settings = Settings(
        var_dir=tmp_path / "var",
        redis={"url": server.url},
        model={"default": "lanczos"},
        worker={"models": ["lanczos"]},
    )
    try:
        yield settings, server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


class RedisDiesDuringUpscale(LanczosUpscaler):
    """The real Lanczos upscaler; Redis is killed as it reports progress, and started again
    (on its append-only file) a little later from another thread."""

    def __init__(self, server: EmbeddedRedis) -> None:
        super().__init__()
        self.server = server
        self.restarter: threading.Thread | None = None

    def upscale(self, image, options, on_progress=None):  # type: ignore[no-untyped-def]
        def progress(stage: str, step: int, total: int) -> None:
            if self.restarter is None:
                self.server.stop(kill=True)
                self.restarter = threading.Thread(target=self._restart_soon)
                self.restarter.start()
            if on_progress is not None:
                on_progress(stage, step, total)

        return super().upscale(image, options, on_progress=progress)

    def _restart_soon(self) -> None:
        time.sleep(1.5)
        self.server.start()


def test_a_job_that_loses_redis_is_handed_back_once_redis_returns(
    aof_settings: tuple[Settings, EmbeddedRedis], tmp_path: Path
) -> None:
    settings, server = aof_settings
    runtime = in_process_runtime(settings, tmp_path / "storage")
    upscaler = RedisDiesDuringUpscale(server)
    runtime.upscalers = {next(iter(runtime.upscalers)): upscaler}
    payload = _accept(runtime)
    outcome = JobRunner(runtime, payload).run()
    assert upscaler.restarter is not None
    upscaler.restarter.join(timeout=30)
    assert outcome == {"status": "requeued"}
    record = runtime.jobs.get(payload.job_id)
    assert record.status is JobStatus.QUEUED and record.attempts == 0, record
    assert record.error is None


def test_a_job_that_loses_redis_as_it_starts_is_handed_back(
    aof_settings: tuple[Settings, EmbeddedRedis], tmp_path: Path
) -> None:
    settings, server = aof_settings
    runtime = in_process_runtime(settings, tmp_path / "storage")
    payload = _accept(runtime)
    transition = runtime.jobs.transition
    restarter = threading.Timer(1.5, server.start)

    def transition_then_lose_redis(job_id: str, **fields: object) -> bool:
        moved = transition(job_id, **fields)  # type: ignore[arg-type]
        if fields.get("to") is JobStatus.PROCESSING:
            server.stop(kill=True)  # the write landed; the next ones fail until the restart
            restarter.start()
        return moved

    runtime.jobs.transition = transition_then_lose_redis  # type: ignore[method-assign]
    # The runner hands the job back itself once Redis is back, or leaves it to RQ's loop (as
    # any Redis loss around a job).
    with contextlib.suppress(RedisConnectionError):
        JobRunner(runtime, payload).run()
    restarter.join(timeout=30)
    assert runtime.connection is not None
    wait_for_redis(runtime.connection, should_stop=lambda: False)
    # What the worker's loop does once Redis is back (worker.main._take_jobs_until_stopped).
    hand_back_held_jobs(runtime, reason="lost Redis")
    record = runtime.jobs.get(payload.job_id)
    assert record.status is JobStatus.QUEUED and record.attempts == 0, record
