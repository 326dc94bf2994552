"""The worker's scheduler child can always be stopped, so a stopping worker always exits.

RQ forks its scheduler and, on the way out, sends it SIGTERM and joins it. A SIGTERM that came
before the child had installed its own handlers used to be swallowed by the handler the child
inherited from the worker, and the worker then waited on the child forever (the SIGTERM chaos
test: a worker still running 60 s after a stop in the instant it started).
"""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from redis import Redis

from core.embedded_redis import EmbeddedRedis
from core.settings import Settings
from worker import main as worker_main
from worker.main import ServingWorker
from worker.runtime import WorkerRuntime

ROOT = Path(__file__).resolve().parents[2]

# Run in its own interpreter: the fork hook is process-wide and cannot be taken back.
FORKED_CHILD_PROBE = """
import multiprocessing, signal, sys, time
from worker.main import die_with_this_process_on_fork

def sleep_long() -> None:
    time.sleep(30)

# What the worker has in place while RQ's loop starts: a handler that only marks a stop.
signal.signal(signal.SIGTERM, lambda signum, frame: None)
die_with_this_process_on_fork()
child = multiprocessing.get_context("fork").Process(target=sleep_long)
child.start()
time.sleep(float(sys.argv[1]))
child.terminate()  # SIGTERM before the child installs handlers of its own
child.join(10)
print(child.exitcode)
"""


# 0 s: the SIGTERM may land while the child is still in the fork hooks; 0.3 s: after them.
@pytest.mark.parametrize("delay_seconds", ["0", "0.3"])
def test_a_forked_child_stops_on_sigterm_before_it_has_handlers_of_its_own(
    delay_seconds: str,
) -> None:
    probe = subprocess.run(
        [sys.executable, "-c", FORKED_CHILD_PROBE, delay_seconds],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert probe.stdout.strip() == str(-signal.SIGTERM), probe.stdout + probe.stderr


def _ignore_sigterm_and_sleep() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)


def test_a_scheduler_that_ignores_sigterm_is_killed_and_the_worker_goes_on_stopping(
    redis_server: EmbeddedRedis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_main, "SCHEDULER_STOP_SECONDS", 0.5)
    runtime = WorkerRuntime(
        settings=settings, name="w", upscalers={}, storage=None,  # type: ignore[arg-type]
        jobs=None, registry=None, warmup_seconds=0.0,  # type: ignore[arg-type]
    )  # fmt: skip
    worker = ServingWorker(runtime, ["q"], connection=Redis.from_url(redis_server.url))
    child = multiprocessing.get_context("fork").Process(target=_ignore_sigterm_and_sleep)
    child.start()
    time.sleep(0.5)  # the child has set SIG_IGN: only a kill stops it
    worker.scheduler = SimpleNamespace(_process=child)  # type: ignore[assignment]
    stopping = threading.Thread(target=worker.stop_scheduler, daemon=True)
    try:
        stopping.start()
        stopping.join(30)
        assert not stopping.is_alive(), "stop_scheduler is still waiting on its child"
        assert child.exitcode == -signal.SIGKILL
    finally:
        if child.is_alive():
            child.kill()
            child.join()
