"""Redis lost in the middle of a job (a progress update fails): the runner waits for Redis,
then hands the job back uncounted; it is neither failed nor left `processing` forever."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.embedded_redis import EmbeddedRedis
from core.jobs import JobStatus
from core.settings import Settings
from model.upscalers.lanczos import LanczosUpscaler
from tests.worker.runtimes import in_process_runtime
from tests.worker.test_storage_outage import _accept
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
