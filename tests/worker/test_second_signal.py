"""A second stop signal hands the running job back, however soon it follows the first.

RQ's own second-signal handler ignores a signal that comes within a second of the first, and the
first is still being handled for up to a second while RQ stops the scheduler child: a second
Ctrl-C 0.3 s after the first was lost, and the job ran to the end (the serve Ctrl-C test's flake).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType, SimpleNamespace

import pytest
from redis import Redis
from rq.worker import WorkerStatus

from core.embedded_redis import EmbeddedRedis
from core.settings import Settings
from worker.main import ServingWorker
from worker.runtime import WorkerRuntime


def _stop_slowly_on_sigterm() -> None:
    """A scheduler child that takes half a second to stop, as RQ's (it checks once a second)."""

    def stop(signum: int, frame: FrameType | None) -> None:
        time.sleep(0.5)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    time.sleep(60)


@pytest.fixture
def restored_signal_handlers() -> Iterator[None]:
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_second_signal_right_after_the_first_hands_the_job_back(
    redis_server: EmbeddedRedis, settings: Settings, restored_signal_handlers: None
) -> None:
    runtime = WorkerRuntime(
        settings=settings, name="w", upscalers={}, storage=None,  # type: ignore[arg-type]
        jobs=None, registry=None, warmup_seconds=0.0,  # type: ignore[arg-type]
    )  # fmt: skip
    worker = ServingWorker(runtime, ["q"], connection=Redis.from_url(redis_server.url))
    worker.set_state(WorkerStatus.BUSY)  # a job is running
    scheduler = multiprocessing.get_context("fork").Process(target=_stop_slowly_on_sigterm)
    scheduler.start()
    time.sleep(0.3)  # its handler is in place
    worker.scheduler = SimpleNamespace(_process=scheduler)  # type: ignore[assignment]
    # The second Ctrl-C while the first is still being handled (RQ joins the scheduler in it).
    second = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    try:
        second.start()
        worker.request_stop(signal.SIGTERM, None)  # no SystemExit from the second either
        second.join()
        time.sleep(0.1)  # the main thread runs the handler at its next check
        assert runtime.shutdown_due(), "the second signal did not hand the job back"
    finally:
        second.cancel()
        if scheduler.is_alive():
            scheduler.kill()
        scheduler.join()
