"""Shared fixtures: real redis-server processes, a real S3 server (moto), real service processes."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from core.embedded_redis import EmbeddedRedis
from core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]

# Every process the suite starts inherits this mark, so that the end of the run can find any
# left running, even one whose parent died and left it to init (a killed `serve`'s children).
SESSION_MARK = "SPASEMSR_TEST_SESSION"


def pytest_sessionstart(session: pytest.Session) -> None:
    os.environ[SESSION_MARK] = f"{os.getpid()}-{time.time_ns()}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No process of this run may outlive it: report and kill any that did, and fail."""
    leftovers = _processes_of_this_session()
    if not leftovers:
        return
    _, leftovers = psutil.wait_procs(leftovers, timeout=5)  # some are still shutting down
    if not leftovers:
        return
    names = [f"{p.pid} {' '.join(_command_of(p))[:120]}" for p in leftovers]
    for process in leftovers:
        with contextlib.suppress(psutil.Error):
            process.kill()
    print(
        f"\n{len(names)} process(es) of the suite were left running (killed now):", file=sys.stderr
    )
    for name in names:
        print(f"  {name}", file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _processes_of_this_session() -> list[psutil.Process]:
    mark = os.environ.get(SESSION_MARK)
    ours = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for process in psutil.process_iter():
        if process.pid in ours:
            continue
        with contextlib.suppress(psutil.Error):
            if process.environ().get(SESSION_MARK) == mark and process.status() != "zombie":
                found.append(process)
    return found


def _command_of(process: psutil.Process) -> list[str]:
    try:
        return list(process.cmdline())
    except psutil.Error:
        return ["?"]


@pytest.fixture
def redis_server() -> Iterator[EmbeddedRedis]:
    """A fresh redis-server on its own unix socket (short path: sockets have a length limit)."""
    directory = Path(tempfile.mkdtemp(prefix="ssr-redis-"))
    server = EmbeddedRedis(directory, appendonly=False).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 in server mode: real HTTP and the real S3 wire protocol, offline."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, request: pytest.FixtureRequest) -> dict[str, str]:
    bucket = f"t-{abs(hash(request.node.nodeid)) % 10**10}-{int(time.time() * 1000) % 10**6}"
    return {
        "SPASEMSR_STORAGE__BACKEND": "s3",
        "SPASEMSR_STORAGE__S3_ENDPOINT_URL": s3_endpoint,
        "SPASEMSR_STORAGE__S3_BUCKET": bucket,
        "SPASEMSR_STORAGE__S3_ACCESS_KEY_ID": "testing",
        "SPASEMSR_STORAGE__S3_SECRET_ACCESS_KEY": "testing",
        "SPASEMSR_STORAGE__S3_CREATE_BUCKET": "true",
    }


@pytest.fixture
def settings(redis_server: EmbeddedRedis, tmp_path: Path) -> Settings:
    return Settings(
        var_dir=tmp_path / "var",
        redis={"url": redis_server.url},
        model={"default": "lanczos"},
        worker={"models": ["lanczos"]},
    )


def png_bytes(width: int = 24, height: int = 16, *, mode: str = "RGB") -> bytes:
    image = Image.new(mode, (width, height))
    pixels = image.load()
    assert pixels is not None
    for y in range(height):
        for x in range(width):
            pixels[x, y] = ((x * 37) % 256, (y * 53) % 256, ((x + y) * 11) % 256)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


class ServiceProcesses:
    """The API under uvicorn and workers, each a separate OS process, as in production."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        self.log_dir = log_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = (self.log_dir / log_name).open("ab")
        return subprocess.Popen(args, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def start_api(self) -> None:
        self.api = self._spawn(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "app.main:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            "api.log",
        )
        self._wait_for("/healthz", timeout=30)

    def start_worker(self, *, wait_ready: bool = True, timeout: float = 120) -> None:
        index = len(self.workers)
        self.workers.append(self._spawn([sys.executable, "-m", "worker"], f"worker{index}.log"))
        if wait_ready:
            self.wait_ready(timeout=timeout)

    def wait_ready(self, timeout: float = 120) -> None:
        self._wait_for("/readyz", timeout=timeout)

    def _wait_for(self, path: str, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._raise_if_dead()
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{path} not ready after {timeout} s\n{self.logs()}")

    def _raise_if_dead(self) -> None:
        for process in [self.api, *self.workers]:
            if process is not None and process.poll() is not None:
                raise RuntimeError(
                    f"{process.args!r} exited with {process.returncode}\n{self.logs()}"
                )

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}"
            for path in sorted(self.log_dir.glob("*.log"))
        )

    def stop(self) -> None:
        for process in [*self.workers, self.api]:
            if process is not None and process.poll() is None:
                process.terminate()
        for process in [*self.workers, self.api]:
            if process is not None:
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def start_service(
    redis_url: str, tmp_path: Path, *, workers: int = 1, **env: str
) -> ServiceProcesses:
    service = ServiceProcesses(
        {
            "SPASEMSR_REDIS__URL": redis_url,
            "SPASEMSR_VAR_DIR": str(tmp_path / "var"),
            "SPASEMSR_WORKER__HEARTBEAT_SECONDS": "1",
            **env,
        },
        tmp_path,
    )
    try:
        service.start_api()
        for _ in range(workers):
            service.start_worker(wait_ready=False)
        if workers:
            service.wait_ready()
    except BaseException:
        service.stop()
        raise
    return service


def wait_for_status(
    client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 60
) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, object] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} never reached {statuses}: {job}")
