"""Chaos against `spasemsr serve` from outside, as an operator's bad day would go: kill -9 of
each kind of process it runs (API, redis-server, workers, serve itself), a second `serve` on
the same data directory, SIGTERM during a job. Each test prints its counts (accepted /
succeeded / failed / lost / duplicated); 0 lost and 0 duplicated are the assertions.

``SPASEMSR_CHAOS_CYCLES`` sets how many rounds of faults each test injects (``make chaos``
runs 50; ``make test`` a bounded few).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from redis import Redis

from tests.chaos.serve_harness import Serve, outcomes, serve_env, submit, tally
from tests.chaos.test_faults import slow_image
from tests.conftest import png_bytes

CYCLES = int(os.environ.get("SPASEMSR_CHAOS_CYCLES", "2"))


@pytest.fixture
def serve_dir(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    # A short folder of its own: the embedded redis listens on a unix socket inside it.
    var_dir = Path(tempfile.mkdtemp(prefix="ssr-serve-"))
    yield var_dir, tmp_path


def _serve(dirs: tuple[Path, Path], **env: str) -> Serve:
    var_dir, log_dir = dirs
    return Serve(var_dir=var_dir, log_dir=log_dir, env=serve_env(var_dir, **env))


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def _assert_none_lost_or_twice(counts: dict[str, int], serve: Serve) -> None:
    assert counts["lost"] == 0 and counts["duplicated"] == 0, (counts, serve.logs())
    assert counts["failed"] == 0, (counts, serve.logs())


def test_serve_restarts_every_child_it_started(serve_dir: tuple[Path, Path]) -> None:
    """kill -9 of the API, of the embedded redis-server, and of the worker more often than
    its crash budget: `serve` starts each again and stays up; no accepted job is lost."""
    serve = _serve(serve_dir)
    accepted: list[str] = []
    try:
        serve.start()
        with httpx.Client(base_url=serve.url, timeout=30) as client:
            for _ in range(CYCLES):
                accepted += [submit(client, png_bytes(), scale="2") for _ in range(3)]
                for name in ("api", "redis"):
                    old = serve.wait_child(name)
                    _kill(old)
                    serve.wait_child(name, not_pid=old)
                    serve.wait_ready()
                    accepted.append(submit(client, png_bytes(), scale="2"))
            # More worker exits than the budget allows: later starts are delayed, not refused.
            for _ in range(7):
                _kill(serve.wait_child("worker-1"))
                time.sleep(0.3)
            serve.wait_ready(timeout=120)
            accepted += [submit(client, png_bytes(), scale="2") for _ in range(2)]
            status = outcomes(client, accepted)
        assert serve.process is not None and serve.process.poll() is None, serve.logs()
        counts = tally("restart-children", serve, status, accepted)
        _assert_none_lost_or_twice(counts, serve)
        assert "starting it again in" in serve.logs()
        assert serve.stop() == 0
    finally:
        serve.kill_everything()


def test_one_serve_per_data_dir_and_a_killed_one_is_cleaned_up(
    serve_dir: tuple[Path, Path],
) -> None:
    """kill -9 of `serve` leaves its children running; a second `serve` while the first lives
    exits 1 naming its pid; a new `serve` after the first died stops the orphans first (one
    redis-server on the AOF, one set of workers): every job runs once."""
    serve = _serve(serve_dir)
    accepted: list[str] = []
    try:
        first = serve.start()
        rival = serve.spawn(stdout=subprocess.PIPE)
        output, _ = rival.communicate(timeout=60)
        assert rival.returncode == 1, output
        assert f"pid {first.pid}" in output.decode()
        with httpx.Client(base_url=serve.url, timeout=30) as client:
            for _ in range(CYCLES):
                accepted += [submit(client, slow_image(), scale="2")]
                accepted += [submit(client, png_bytes(), scale="2") for _ in range(4)]
                orphans = serve.children()
                assert {"redis", "api", "worker-1"} <= set(orphans), serve.logs()
                serve.stop(signal.SIGKILL)
                assert all(p.is_running() for p in orphans.values())  # they run on by themselves
                serve.start(wait=False)
                serve.wait_child("api", not_pid=orphans["api"].pid)  # its own, not the orphan
                serve.wait_ready()
                gone = [n for n, p in orphans.items() if _alive(p)]
                assert gone == [], f"orphans still running: {gone}\n{serve.logs()}"
            status = outcomes(client, accepted)
        counts = tally("kill-serve", serve, status, accepted)
        _assert_none_lost_or_twice(counts, serve)
        assert serve.stop() == 0
        assert not list((serve.var_dir / "run").glob("*.pid"))
    finally:
        serve.kill_everything()


def test_sigterm_waits_the_worker_grace_then_hands_the_job_back(
    serve_dir: tuple[Path, Path],
) -> None:
    """Within the grace the running job finishes; past it, it goes back to the queue without
    counting an attempt, and the next `serve` runs it."""
    serve = _serve(serve_dir, SPASEMSR_WORKER__SHUTDOWN_GRACE_SECONDS="60")
    try:
        serve.start()
        with httpx.Client(base_url=serve.url, timeout=30) as client:
            finishes = submit(client, slow_image(), scale="4")
            _wait_for_status(client, finishes, "processing")
            assert serve.stop() == 0
        serve.env["SPASEMSR_WORKER__SHUTDOWN_GRACE_SECONDS"] = "0"
        serve.start()
        with httpx.Client(base_url=serve.url, timeout=30) as client:
            assert client.get(f"/v1/jobs/{finishes}").json()["status"] == "succeeded"
            handed_back = submit(client, slow_image(), scale="4")
            _wait_for_status(client, handed_back, "processing")
            assert serve.stop() == 0
            serve.start()
            status = outcomes(client, [finishes, handed_back])
            attempts = _redis_of(serve).hget(f"spasemsr:job:{handed_back}", "attempts")
        counts = tally("sigterm-grace", serve, status, [finishes, handed_back])
        _assert_none_lost_or_twice(counts, serve)
        assert attempts == b"1", "the hand-back counted an attempt"
        assert serve.stop() == 0
    finally:
        serve.kill_everything()


def _alive(process: psutil.Process) -> bool:
    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _redis_of(serve: Serve) -> Redis:
    return Redis(unix_socket_path=str(serve.var_dir / "redis" / "redis.sock"))


def _wait_for_status(client: httpx.Client, job_id: str, wanted: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] != wanted:
        assert time.monotonic() < deadline, f"{job_id} never {wanted}: {job}"
        time.sleep(0.02)


def test_killed_workers_leave_no_scheduler_behind(serve_dir: tuple[Path, Path]) -> None:
    """RQ forks a scheduler from the worker; kill -9 of the worker ends it too."""
    serve = _serve(serve_dir)
    try:
        serve.start()
        worker = psutil.Process(serve.wait_child("worker-1"))
        deadline = time.monotonic() + 30
        while not (children := worker.children()):
            assert time.monotonic() < deadline, "the worker never started its scheduler"
            time.sleep(0.1)
        worker.kill()
        _, alive = psutil.wait_procs(children, timeout=20)
        assert alive == [], f"scheduler left running: {alive}"
        assert serve.stop() == 0
    finally:
        serve.kill_everything()
