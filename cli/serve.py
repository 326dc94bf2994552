"""``spasemsr serve``: the whole service on one machine (what ``make run`` uses).

Starts an embedded ``redis-server`` unless a Redis URL is configured, then the API and the
workers as child processes sharing the same settings, and supervises all of them: a child
that exits is started again (the embedded Redis on its append-only file), quickly while it
stays within its crash budget, then with a growing delay; ``serve`` itself only ends when
asked to. SIGTERM or Ctrl-C stops it gracefully: the workers get the worker grace period
(``SPASEMSR_WORKER__SHUTDOWN_GRACE_SECONDS``) to finish or hand back their jobs.

Exit codes: 0 stopped on request; 1 could not start (the data directory is in use by
another ``serve``, the API port is taken, Redis would not start); 130 stopped on a second
signal (running jobs handed back at once).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from types import FrameType

from cli.instance import DataDirInUse, DataDirLock, PidFiles, stop_orphans
from core.embedded_redis import EmbeddedRedis
from core.secrets_check import RefusedToStart, refuse_unusable_api_keys
from core.settings import Settings

logger = logging.getLogger(__name__)


class ServeExit(IntEnum):
    STOPPED = 0
    """Stopped on request (SIGTERM, SIGINT)."""
    NOT_STARTED = 1
    """Could not start: data directory in use, API port taken, Redis would not start."""
    INTERRUPTED = 130
    """Stopped on a second signal: running jobs were handed back without their grace."""


# After the grace period a worker hands its job back at the job's next step; this covers
# that step and the hand-back itself before the worker is killed.
HAND_BACK_MARGIN_SECONDS = 15.0
API_STOP_SECONDS = 15.0


def child_environment(settings: Settings, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["SPASEMSR_REDIS__URL"] = redis_url
    env["SPASEMSR_VAR_DIR"] = str(settings.var_dir.resolve())
    env["SPASEMSR_API__HOST"] = settings.api.host
    env["SPASEMSR_API__PORT"] = str(settings.api.port)
    return env


def api_command() -> list[str]:
    """The API under uvicorn with a deadline on request heads; host and port come from the
    child's environment (``child_environment``)."""
    return [sys.executable, "-m", "app.server"]


def worker_command() -> list[str]:
    return [sys.executable, "-m", "worker"]


@dataclass
class RestartPolicy:
    """A crash budget per child: within it a child is started again at once; past it, each
    further exit doubles the delay (up to ``max_delay_seconds``), so a child that cannot run
    (a broken GPU, a bad setting) neither spins nor stops the rest of the service."""

    budget: int = 5
    window_seconds: float = 60.0
    quick_delay_seconds: float = 0.5
    max_delay_seconds: float = 60.0

    def delay(self, exits: list[float], now: float) -> float:
        recent = sum(1 for t in exits if now - t < self.window_seconds)
        if recent <= self.budget:
            return self.quick_delay_seconds
        return float(min(self.max_delay_seconds, 2 ** (recent - self.budget)))


@dataclass
class Child:
    """One supervised process: a command, or the embedded Redis."""

    name: str
    command: list[str] | None = None
    env: dict[str, str] | None = None
    redis: EmbeddedRedis | None = None
    process: subprocess.Popen[bytes] | None = None
    exits: list[float] = field(default_factory=list)
    start_at: float | None = 0.0
    """When to (re)start it; ``None`` while it runs."""

    @property
    def is_worker(self) -> bool:
        return self.name.startswith("worker")

    def start(self) -> None:
        if self.redis is not None:
            self.redis.start()
            self.process = self.redis.process
        else:
            assert self.command is not None
            # Its own session: Ctrl-C in the terminal reaches only `serve`, which decides
            # what each child gets (a worker's second SIGINT would drop its grace period).
            self.process = subprocess.Popen(self.command, env=self.env, start_new_session=True)
        self.start_at = None

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def exited(self) -> int | None:
        """The exit code if it has exited since it was started."""
        if self.start_at is not None or self.process is None:
            return None
        return self.process.poll()


class Supervisor:
    def __init__(
        self,
        children: list[Child],
        pid_files: PidFiles,
        *,
        grace_seconds: float,
        policy: RestartPolicy | None = None,
    ) -> None:
        self.children = children
        self.pid_files = pid_files
        self.grace_seconds = grace_seconds
        self.policy = policy or RestartPolicy()
        self.stop_signals = 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_signals += 1
        if self.stop_signals > 1:  # a second Ctrl-C: hand the running jobs back now
            print("Handing running jobs back now.", flush=True)
            # SIGINT, not a second SIGTERM: a worker busy in native code would see two
            # pending SIGTERMs as one; two different signals both reach its handlers.
            for child in self.children:
                if child.is_worker:
                    child.signal(signal.SIGINT)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            while not self.stop_signals:
                self._tend(time.monotonic())
                time.sleep(0.2)
        finally:
            self.stop()
        return ServeExit.INTERRUPTED if self.stop_signals > 1 else ServeExit.STOPPED

    def _tend(self, now: float) -> None:
        for child in self.children:
            if (code := child.exited()) is not None:
                child.exits = [t for t in child.exits if now - t < self.policy.window_seconds]
                child.exits.append(now)
                delay = self.policy.delay(child.exits, now)
                level = (
                    logging.WARNING if delay <= self.policy.quick_delay_seconds else logging.ERROR
                )
                logger.log(level, "%s exited with %s (%d times in %.0f s); starting it again "
                           "in %.1f s", child.name, code, len(child.exits),
                           self.policy.window_seconds, delay)  # fmt: skip
                child.start_at = now + delay
            elif child.start_at is not None and now >= child.start_at:
                self._start(child, now)

    def _start(self, child: Child, now: float) -> None:
        try:
            child.start()
        except (OSError, RuntimeError) as exc:
            child.exits.append(now)
            delay = self.policy.delay(child.exits, now)
            logger.error("could not start %s: %s; trying again in %.1f s", child.name, exc, delay)
            child.start_at = now + delay
            return
        if child.process is not None:
            self.pid_files.record(child.name, child.process.pid)

    def stop(self) -> None:
        """Workers and API first (workers within their grace), Redis last: a worker's hand-back
        and the API's last answers still need it."""
        workers = [c for c in self.children if c.is_worker]
        api = [c for c in self.children if c.name == "api"]
        wait = self.grace_seconds + HAND_BACK_MARGIN_SECONDS
        if any(c.process and c.process.poll() is None for c in workers):
            print(
                f"Stopping: running jobs have up to {self.grace_seconds:.0f} s to finish, then "
                "go back to the queue (Ctrl-C again: hand them back now).",
                flush=True,
            )
        for child in workers + api:
            child.signal(signal.SIGTERM)
        _wait_or_kill(workers, wait)
        _wait_or_kill(api, API_STOP_SECONDS)
        for child in self.children:
            if child.redis is not None:
                child.redis.stop()
            self.pid_files.forget(child.name)
        print("SpaSemSR Serve stopped.", flush=True)


def _wait_or_kill(children: list[Child], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for child in children:
        if child.process is None:
            continue
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.error("%s did not stop within %.0f s; killing it", child.name, seconds)
            child.process.kill()
            child.process.wait()


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def serve(settings: Settings, *, workers: int = 1) -> int:
    try:
        # Checked here too: a child that refuses to start would only be restarted forever.
        refuse_unusable_api_keys(settings.api)
    except RefusedToStart as exc:
        print(exc, file=sys.stderr)
        return ServeExit.NOT_STARTED
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    var_dir = settings.var_dir.resolve()
    lock = DataDirLock(var_dir)
    try:
        lock.acquire()
    except DataDirInUse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ServeExit.NOT_STARTED
    try:
        return _serve_locked(settings, var_dir, workers=workers)
    except KeyboardInterrupt:  # Ctrl-C while starting: nothing is running yet to stop
        return ServeExit.STOPPED
    finally:
        lock.release()


def _serve_locked(settings: Settings, var_dir: Path, *, workers: int) -> int:
    pid_files = PidFiles(var_dir)
    stop_orphans(pid_files)
    if port_in_use(settings.api.host, settings.api.port):
        print(f"error: {settings.api.host}:{settings.api.port} is in use; choose another port "
              "(--port, or SPASEMSR_API__PORT)", file=sys.stderr)  # fmt: skip
        return ServeExit.NOT_STARTED
    children: list[Child] = []
    redis_url = settings.redis.url
    if redis_url is None:
        embedded = EmbeddedRedis(var_dir / "redis", own_session=True)
        redis_child = Child("redis", redis=embedded)
        try:
            redis_child.start()
        except (OSError, RuntimeError, ValueError) as exc:
            print(f"error: the embedded Redis would not start: {exc}", file=sys.stderr)
            return ServeExit.NOT_STARTED
        assert embedded.process is not None
        pid_files.record("redis", embedded.process.pid)
        children.append(redis_child)
        redis_url = embedded.url
    try:
        return _supervise(settings, children, pid_files, redis_url, workers=workers)
    except KeyboardInterrupt:
        for child in children:
            if child.redis is not None:
                child.redis.stop()
        raise


def _supervise(
    settings: Settings, children: list[Child], pid_files: PidFiles, redis_url: str, *, workers: int
) -> int:
    env = child_environment(settings, redis_url)
    children.append(Child("api", command=api_command(), env=env))
    children += [
        Child(f"worker-{n}", command=worker_command(), env=env) for n in range(1, workers + 1)
    ]
    url = f"http://{settings.api.host}:{settings.api.port}"
    print(f"SpaSemSR Serve is starting at {url}  (docs: {url}/docs; Ctrl-C stops it)", flush=True)
    supervisor = Supervisor(
        children, pid_files, grace_seconds=settings.worker.shutdown_grace_seconds
    )
    return supervisor.run()
