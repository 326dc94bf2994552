"""A Redis outage under a busy worker: kill -9 of redis-server mid-job, down for seconds, then
started again on its AOF. The worker waits and reconnects instead of exiting (its health check
says not ready meanwhile), hands back the job it was running without counting an attempt, and
every accepted job ends succeeded, once. ``SPASEMSR_CHAOS_CYCLES`` outages (``make chaos``
runs 50).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from core.embedded_redis import EmbeddedRedis
from tests.chaos.test_faults import FAST_RECOVERY, _record, _submit, _wait_all, slow_image
from tests.chaos.test_faults import aof_redis as aof_redis  # the fixture: AOF on, own folder
from tests.conftest import ROOT, png_bytes, start_service

CYCLES = int(os.environ.get("SPASEMSR_CHAOS_CYCLES", "2"))
OUTAGE_SECONDS = 4.0


def _worker_healthcheck(env: dict[str, str]) -> int:
    return subprocess.run(
        [sys.executable, "-m", "worker.healthcheck"], cwd=ROOT, env=env,
        capture_output=True, timeout=60,
    ).returncode  # fmt: skip


def test_worker_rides_out_a_redis_outage(aof_redis: EmbeddedRedis, tmp_path: Path) -> None:
    service = start_service(aof_redis.url, tmp_path, workers=1, **FAST_RECOVERY)
    accepted: list[str] = []
    in_flight: list[str] = []
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            for _ in range(CYCLES):
                victim = _submit(client, slow_image(), scale="4")
                accepted += [victim] + [_submit(client, png_bytes(), scale="2") for _ in range(3)]
                deadline = time.monotonic() + 60
                while _record(aof_redis.url, victim)["status"] != "processing":
                    assert time.monotonic() < deadline, service.logs()
                    time.sleep(0.02)
                in_flight.append(victim)
                aof_redis.stop(kill=True)
                time.sleep(OUTAGE_SECONDS / 2)
                assert _worker_healthcheck(service.env) == 1  # not ready while Redis is gone
                time.sleep(OUTAGE_SECONDS / 2)
                assert service.workers[0].poll() is None, f"the worker exited\n{service.logs()}"
                aof_redis.start()  # same folder: replays the append-only file
            jobs = _wait_all(client, accepted, timeout=180)
        succeeded = sum(1 for j in jobs if j["status"] == "succeeded")
        failed = sum(1 for j in jobs if j["status"] == "failed")
        attempts = {i: int(str(_record(aof_redis.url, i)["attempts"])) for i in accepted}
        twice = [i for i, n in attempts.items() if n != 1]
        lost = len(accepted) - succeeded - failed
        print(f"\nchaos redis-outage: accepted {len(accepted)}, succeeded {succeeded}, "
              f"failed {failed}, lost {lost}, duplicated {len(twice)}")  # fmt: skip
        assert succeeded == len(accepted), (jobs, service.logs())
        assert twice == [], (attempts, service.logs())  # the hand-backs counted no attempt
        assert service.workers[0].poll() is None, service.logs()  # one process throughout
        assert _worker_healthcheck(service.env) == 0
    finally:
        service.stop()
