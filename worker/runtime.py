"""What one worker process holds for its whole life: the warm upscaler and its connections.

RQ calls tasks by name, so the task finds the process's runtime here; it is installed once
by ``worker.main`` after the model has been loaded and warmed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

from core.jobs import utcnow
from core.queue import JobQueue
from core.records import JobStore
from core.recovery import JobRecovery
from core.settings import Settings
from core.storage import ObjectStorage
from core.workers import ModelInfo, WorkerInfo, WorkerRegistry, WorkerState
from model.upscaler import Upscaler

logger = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    settings: Settings
    name: str
    upscaler: Upscaler
    storage: ObjectStorage
    jobs: JobStore
    registry: WorkerRegistry
    warmup_seconds: float
    queue: JobQueue | None = None
    """Where follow-up work (webhook deliveries) is queued; ``None`` in unit tests."""
    recovery: JobRecovery | None = None
    """Marks running jobs and hands back those of dead workers; ``None`` in unit tests."""
    shutdown_deadline: float | None = None
    state: WorkerState = WorkerState.IDLE
    started_at: datetime = field(default_factory=utcnow)

    @contextmanager
    def busy(self) -> Iterator[None]:
        self.state = WorkerState.BUSY
        self.announce()
        try:
            yield
        finally:
            self.state = WorkerState.IDLE
            self.announce()

    def begin_shutdown(self, *, immediately: bool = False) -> None:
        """SIGTERM: the current job may go on for the grace period, then it is handed back."""
        grace = 0.0 if immediately else self.settings.worker.shutdown_grace_seconds
        deadline = time.monotonic() + grace
        if self.shutdown_deadline is None or deadline < self.shutdown_deadline:
            self.shutdown_deadline = deadline

    def shutdown_due(self) -> bool:
        return self.shutdown_deadline is not None and time.monotonic() >= self.shutdown_deadline

    def info(self) -> WorkerInfo:
        card = self.upscaler.card
        return WorkerInfo(
            name=self.name,
            state=self.state,
            model=ModelInfo(
                name=card.name,
                version=card.version,
                configuration=card.configuration,
                weights=card.weights,
                trained=card.trained,
                device=card.device,
                dtype=card.dtype,
                description=card.description,
            ),
            pid=os.getpid(),
            hostname=socket.gethostname(),
            started_at=self.started_at,
            warmup_seconds=self.warmup_seconds,
        )

    def announce(self) -> None:
        try:
            self.registry.announce(
                self.info(), ttl_seconds=3 * self.settings.worker.heartbeat_seconds
            )
        except Exception:
            logger.warning("could not announce worker %s", self.name, exc_info=True)


class Heartbeat(threading.Thread):
    """Keeps the worker's registry entry alive while the main thread runs jobs."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.runtime = runtime
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.runtime.settings.worker.heartbeat_seconds):
            self.runtime.announce()
            self._recover_lost_jobs()

    def _recover_lost_jobs(self) -> None:
        recovery = self.runtime.recovery
        if recovery is None:
            return
        try:
            recovered = recovery.sweep()
        except Exception:
            logger.warning("recovery sweep failed", exc_info=True)
            return
        if recovered:
            logger.warning("handed back %d job(s) of dead workers: %s", len(recovered), recovered)


_current: WorkerRuntime | None = None


def install_runtime(runtime: WorkerRuntime) -> None:
    global _current
    _current = runtime


def current_runtime() -> WorkerRuntime:
    if _current is None:
        raise RuntimeError("worker runtime not installed: run jobs through `spasemsr worker`")
    return _current
