"""One ``spasemsr serve`` per data directory, and the clean-up after one that was killed.

The lock is an advisory ``flock`` on ``<var_dir>/serve.lock``, held for the life of the
process: the kernel drops it when the process dies however it dies, so a stale lock never
blocks a restart. Every child ``serve`` starts is written to ``<var_dir>/run/<name>.pid``
with its start time; a new ``serve`` that takes the lock stops whatever those files still
name (the children of a ``serve`` killed with SIGKILL run on by themselves: a second
redis-server on the same AOF, or a second set of workers, would run jobs twice).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
from pathlib import Path
from typing import IO

import psutil

logger = logging.getLogger(__name__)


class DataDirInUse(RuntimeError):
    """Another live ``serve`` holds the data directory."""


class DataDirLock:
    def __init__(self, var_dir: Path) -> None:
        self.path = var_dir / "serve.lock"
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise DataDirInUse(
                f"another `spasemsr serve` (pid {holder}) is using {self.path.parent}; stop it "
                "first, or give this one its own folder with SPASEMSR_VAR_DIR"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()  # closing the descriptor drops the lock


class PidFiles:
    """``<var_dir>/run/<name>.pid``: pid and start time of each child process."""

    def __init__(self, var_dir: Path) -> None:
        self.directory = var_dir / "run"

    def record(self, name: str, pid: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        started = _start_time(pid)
        if started is not None:
            entry = json.dumps({"pid": pid, "started": started})
            (self.directory / f"{name}.pid").write_text(entry)

    def forget(self, name: str) -> None:
        (self.directory / f"{name}.pid").unlink(missing_ok=True)

    def survivors(self) -> dict[str, psutil.Process]:
        """The recorded processes still alive: same pid *and* same start time (a pid the
        system gave to an unrelated process since is left alone)."""
        alive: dict[str, psutil.Process] = {}
        for path in sorted(self.directory.glob("*.pid")):
            try:
                entry = json.loads(path.read_text())
                process = psutil.Process(int(entry["pid"]))
                if process.create_time() == float(entry["started"]):
                    alive[path.stem] = process
            except (OSError, ValueError, KeyError, TypeError, psutil.Error):
                pass
            path.unlink(missing_ok=True)
        return alive


def stop_orphans(pid_files: PidFiles, *, timeout_seconds: float = 15.0) -> list[str]:
    """Stop what a dead ``serve`` left running: API and workers first, Redis last (so that the
    workers can still hand their jobs back). Returns the names it stopped."""
    survivors = pid_files.survivors()
    if not survivors:
        return []
    logger.warning(
        "a previous serve left %s running; stopping them first", ", ".join(sorted(survivors))
    )
    redis = {name: p for name, p in survivors.items() if name == "redis"}
    others = {name: p for name, p in survivors.items() if name != "redis"}
    # Twice: a worker's first signal lets the job run on, the second hands it back now (two
    # different signals, as two pending SIGTERMs would reach a busy process as one).
    _terminate(list(others.values()), signal.SIGTERM, signal.SIGINT, timeout=timeout_seconds)
    _terminate(list(redis.values()), signal.SIGTERM, timeout=timeout_seconds)
    return sorted(survivors)


def _terminate(processes: list[psutil.Process], *signals: int, timeout: float) -> None:
    for signum in signals:
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signum)
        _, processes = psutil.wait_procs(processes, timeout=0.5)
    _, still_alive = psutil.wait_procs(processes, timeout=timeout)
    for process in still_alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(still_alive, timeout=5)


def _start_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None
