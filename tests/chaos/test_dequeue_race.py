"""SIGTERM to an idle worker in the instant a job arrives, repeated: 0 lost, 0 run twice.

Real processes: uvicorn, a worker, redis-server. Each cycle submits a job and SIGTERMs the idle
worker 0-3 ms after the 202, then starts a fresh worker. ``SPASEMSR_CHAOS_CYCLES`` sets the
count (``make chaos`` runs 50; ``make test`` a bounded few).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from redis import Redis

from core.embedded_redis import EmbeddedRedis
from core.workers import WorkerRegistry
from tests.chaos.test_faults import FAST_RECOVERY, _record, _submit, _wait_all
from tests.chaos.test_faults import aof_redis as aof_redis  # the fixture: AOF on, own folder
from tests.conftest import png_bytes, start_service

CYCLES = int(os.environ.get("SPASEMSR_CHAOS_CYCLES", "6"))


def _wait_warm(redis_url: str, pid: int, timeout: float = 120) -> None:
    """Until the worker with ``pid`` itself is warm: /readyz may still count the entry of the
    worker just stopped, and a SIGTERM to a worker still importing is not this test's fault."""
    registry = WorkerRegistry(Redis.from_url(redis_url), prefix="spasemsr")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(w.pid == pid for w in registry.warm()):
            return
        time.sleep(0.05)
    raise TimeoutError(f"worker {pid} not warm after {timeout} s")


def test_sigterm_in_the_dequeue_window_loses_nothing(
    aof_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    service = start_service(
        aof_redis.url, tmp_path, workers=1, SPASEMSR_WORKER__ORPHAN_GRACE_SECONDS="1",
        **FAST_RECOVERY,
    )  # fmt: skip
    accepted: list[str] = []
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            for _ in range(CYCLES):
                worker = service.workers[-1]
                accepted.append(_submit(client, png_bytes(), scale="2"))
                time.sleep(random.uniform(0, 0.003))
                worker.send_signal(signal.SIGTERM)
                try:
                    exit_code = worker.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"worker {worker.pid} still running 60 s after SIGTERM\n"
                                + service.logs())  # fmt: skip
                assert exit_code == 0, service.logs()
                service.workers.remove(worker)
                service.start_worker(wait_ready=False)
                _wait_warm(aof_redis.url, service.workers[-1].pid)
            jobs = _wait_all(client, accepted, timeout=120)
        lost = [j["id"] for j in jobs if j["status"] != "succeeded"]
        twice = [i for i in accepted if int(str(_record(aof_redis.url, i)["attempts"])) != 1]
        print(f"accepted {len(accepted)}, succeeded {len(accepted) - len(lost)}, "
              f"lost {len(lost)}, run twice {len(twice)}")  # fmt: skip
        assert lost == [] and twice == []
    finally:
        service.stop()
