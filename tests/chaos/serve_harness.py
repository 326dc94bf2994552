"""`spasemsr serve` as a real process for chaos tests: start it, find its children, count.

Its children are found through the pid files it writes (``<var>/run/<name>.pid``), the same
files a later ``serve`` uses to clean up after a killed one. Every process a test started is
killed at the end, even when the test failed, including the children of a ``serve`` that the
test killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from tests.conftest import ROOT, free_port

FAST = {
    "SPASEMSR_WORKER__MODELS": '["lanczos"]',
    "SPASEMSR_MODEL__DEFAULT": "lanczos",
    "SPASEMSR_WORKER__HEARTBEAT_SECONDS": "0.5",
    "SPASEMSR_WORKER__RETRY_BACKOFF_SECONDS": "0.5",
    "SPASEMSR_WORKER__ORPHAN_GRACE_SECONDS": "2",
    "SPASEMSR_API__RATE_LIMIT_PER_MINUTE": "0",
}


@dataclass
class Serve:
    """One data directory, and the ``serve`` processes started on it (one at a time)."""

    var_dir: Path
    log_dir: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    runs: int = 0
    seen: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True) -> subprocess.Popen[bytes]:
        self.runs += 1
        log = (self.log_dir / f"serve{self.runs}.log").open("ab")
        self.process = self.spawn(stdout=log)
        self.seen.add(self.process.pid)
        if wait:
            self.wait_ready()
        return self.process

    def spawn(self, **popen: object) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "cli.main", "serve", "--port", str(self.port)]
        # Its own process group, as a terminal gives it (and a Ctrl-C reaches all of it).
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            command, cwd=ROOT, env=self.env, stderr=subprocess.STDOUT, start_new_session=True,
            **popen,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.logs()
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"serve not ready after {timeout} s\n{self.logs()}")

    def children(self) -> dict[str, psutil.Process]:
        """The live processes its pid files name (redis, api, worker-N)."""
        found: dict[str, psutil.Process] = {}
        for path in (self.var_dir / "run").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError, psutil.Error):
                entry = json.loads(path.read_text())
                process = psutil.Process(int(entry["pid"]))
                if process.create_time() == float(entry["started"]) and process.is_running():
                    found[path.stem] = process
                    self.seen.add(process.pid)
        return found

    def wait_child(self, name: str, not_pid: int | None = None, timeout: float = 60) -> int:
        """The pid of child ``name`` once one runs (a new one, if ``not_pid`` is given)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process = self.children().get(name)
            if process is not None and process.pid != not_pid:
                return int(process.pid)
            time.sleep(0.1)
        raise TimeoutError(f"no {name} child (other than {not_pid})\n{self.logs()}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 120) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        return self.process.wait(timeout=timeout)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-6000:]}"
            for p in sorted(self.log_dir.glob("serve*.log"))
        )

    def runs_of(self, job_id: str) -> int:
        """How many times a worker finished ``job_id`` (logged once per completed run)."""
        pattern = re.compile(rf"job {job_id} (succeeded|failed|canceled) in")
        return sum(len(pattern.findall(p.read_text(errors="replace")))
                   for p in self.log_dir.glob("serve*.log"))  # fmt: skip

    def kill_everything(self) -> None:
        processes = []
        for pid in self.seen:
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                processes += [process, *process.children(recursive=True)]
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(processes, timeout=10)


def serve_env(var_dir: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "SPASEMSR_VAR_DIR": str(var_dir), **FAST, **extra}
    env.pop("SPASEMSR_REDIS__URL", None)
    return env


def submit(client: httpx.Client, data: bytes, **form: str) -> str:
    response = client.post("/v1/jobs", files={"image": ("a.png", data, "image/png")}, data=form)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def outcomes(client: httpx.Client, ids: list[str], timeout: float = 180) -> dict[str, str]:
    """The status of each job once all are final, or when ``timeout`` runs out."""
    final = {"succeeded", "failed", "canceled"}
    status: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job_id in ids:
            if status.get(job_id) in final:
                continue
            with contextlib.suppress(httpx.TransportError):
                response = client.get(f"/v1/jobs/{job_id}")
                if response.status_code == 200:
                    status[job_id] = str(response.json()["status"])
        if all(status.get(i) in final for i in ids):
            break
        time.sleep(0.2)
    return status


def tally(name: str, serve: Serve, status: dict[str, str], accepted: list[str]) -> dict[str, int]:
    """Counts of a chaos run, printed (``make chaos`` shows them with ``-s``)."""
    counts = {
        "accepted": len(accepted),
        "succeeded": sum(1 for i in accepted if status.get(i) == "succeeded"),
        "failed": sum(1 for i in accepted if status.get(i) == "failed"),
        "lost": sum(1 for i in accepted if status.get(i) not in {"succeeded", "failed"}),
        "duplicated": sum(1 for i in accepted if serve.runs_of(i) > 1),
    }
    print(f"\nchaos {name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts
