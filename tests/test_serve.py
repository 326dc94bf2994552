"""`spasemsr serve` (what `make run` runs): embedded Redis + API + worker, and a clean stop."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image
from redis import Redis

from core.workers import WorkerRegistry
from tests.conftest import ROOT, free_port


def test_serve_runs_the_demo_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    var = tmp_path  # short enough for the redis unix socket path
    port = free_port()
    env = {
        **os.environ,
        "SPASEMSR_VAR_DIR": str(var / "v"),
        "SPASEMSR_WORKER__MODELS": '["lanczos"]',
        "SPASEMSR_MODEL__DEFAULT": "lanczos",
    }
    env.pop("SPASEMSR_REDIS__URL", None)
    serve = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as in a terminal
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert serve.poll() is None, serve.stdout.read() if serve.stdout else ""
            time.sleep(0.2)
        out = tmp_path / "result.png"
        demo = subprocess.run(
            [sys.executable, "-m", "cli.main", "demo", "--url", f"http://127.0.0.1:{port}",
             "--out", str(out), "--scale", "2"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert demo.returncode == 0, demo.stdout + demo.stderr
        source = Image.open(tmp_path / "demo-input.png")
        assert Image.open(io.BytesIO(out.read_bytes())).size == (
            source.width * 2,
            source.height * 2,
        )
        socket_path = var / "v" / "redis" / "redis.sock"
        assert socket_path.exists()
        # A worker that dies (as on a fatal device error) is replaced by the supervisor.
        registry = WorkerRegistry(Redis(unix_socket_path=str(socket_path)), prefix="spasemsr")
        (first,) = registry.warm()
        os.kill(first.pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while not [w for w in registry.warm() if w.pid != first.pid]:
            assert time.monotonic() < deadline, "no new worker after the old one died"
            time.sleep(0.3)
    finally:
        os.killpg(serve.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
        output, _ = serve.communicate(timeout=60)
    assert serve.returncode == 0, output
    assert "Traceback" not in output, output
    assert f"http://127.0.0.1:{port}" in output
    assert "SpaSemSR Serve stopped." in output
    assert not (var / "v" / "redis" / "redis.sock").exists()  # redis-server is gone too


def test_cli_help_and_unreachable_service_exit_codes() -> None:
    helped = subprocess.run(
        [sys.executable, "-m", "cli.main", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert helped.returncode == 0
    for command in ("serve", "api", "worker", "demo"):
        assert command in helped.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "cli.main", "demo", "--url", f"http://127.0.0.1:{free_port()}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 3
    assert "cannot reach" in refused.stderr


def test_a_second_ctrl_c_hands_the_running_job_back_and_exits_130(tmp_path: Path) -> None:
    from core.embedded_redis import EmbeddedRedis
    from tests.chaos.serve_harness import Serve, serve_env, submit
    from tests.chaos.test_faults import slow_image

    var_dir = tmp_path / "v"
    serve = Serve(var_dir=var_dir, log_dir=tmp_path, env=serve_env(var_dir))
    try:
        serve.start()
        assert serve.process is not None
        with httpx.Client(base_url=serve.url, timeout=30) as client:
            job_id = submit(client, slow_image(), scale="4")
            deadline = time.monotonic() + 60
            while client.get(f"/v1/jobs/{job_id}").json()["status"] != "processing":
                assert time.monotonic() < deadline, serve.logs()
                time.sleep(0.02)
        os.killpg(serve.process.pid, signal.SIGINT)
        time.sleep(0.3)
        os.killpg(serve.process.pid, signal.SIGINT)
        assert serve.process.wait(timeout=60) == 130, serve.logs()
        assert "Traceback" not in serve.logs()
        redis = EmbeddedRedis(var_dir / "redis").start()  # read what serve left in its AOF
        try:
            record = Redis.from_url(redis.url).hgetall(f"spasemsr:job:{job_id}")
        finally:
            redis.stop()
        assert record[b"status"] == b'"queued"' and record[b"attempts"] == b"0", record
    finally:
        serve.kill_everything()
