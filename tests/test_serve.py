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
        serve.send_signal(signal.SIGINT)
        output, _ = serve.communicate(timeout=60)
    assert serve.returncode == 0, output
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
