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

from redis import Redis

from core.errors import ModelNotServed
from core.jobs import SCALES, utcnow
from core.models import ModelName
from core.queue import JobQueue
from core.records import JobStore
from core.recovery import JobRecovery
from core.settings import Settings
from core.storage import ObjectStorage
from core.workers import ModelInfo, WorkerInfo, WorkerRegistry, WorkerState
from model.upscalers.base import ModelCard, Upscaler

logger = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    settings: Settings
    name: str
    upscalers: dict[ModelName, Upscaler]
    """The models this worker holds warm, by name (each one's queues are served)."""
    storage: ObjectStorage
    jobs: JobStore
    registry: WorkerRegistry
    warmup_seconds: float
    queue: JobQueue | None = None
    """Where follow-up work (webhook deliveries) is queued; ``None`` in unit tests."""
    recovery: JobRecovery | None = None
    """Marks running jobs and hands back those of dead workers; ``None`` in unit tests."""
    connection: Redis | None = None
    """The worker's Redis connection, to wait on through an outage; ``None`` in unit tests."""
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

    def stopping(self) -> bool:
        """A stop was requested (the current job may still be within its grace period)."""
        return self.shutdown_deadline is not None

    def shutdown_due(self) -> bool:
        return self.shutdown_deadline is not None and time.monotonic() >= self.shutdown_deadline

    def upscaler_for(self, model: ModelName) -> Upscaler:
        """The warm upscaler of ``model``; a job for a model this worker does not hold (only a
        misrouted or hand-made queue entry) is a typed failure, not a crash."""
        try:
            return self.upscalers[model]
        except KeyError:
            held = ", ".join(name.value for name in self.upscalers)
            raise ModelNotServed(
                f"This worker serves {held}, not {model.value}.", served=list(self.upscalers)
            ) from None

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            name=self.name,
            state=self.state,
            serving=tuple(self.upscalers),
            models=[model_info(upscaler.card) for upscaler in self.upscalers.values()],
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


def model_info(card: ModelCard) -> ModelInfo:
    return ModelInfo(
        name=ModelName(card.name),
        version=card.version,
        configuration=card.configuration,
        weights=card.weights,
        trained=card.trained,
        device=card.device,
        dtype=card.dtype,
        description=card.description,
        source=card.source,
        licence=card.licence,
        # What the contract can ask for: a model that also serves x3 is listed with 2 and 4.
        scales=tuple(scale for scale in card.scales if scale in SCALES),
    )


_current: WorkerRuntime | None = None


def install_runtime(runtime: WorkerRuntime) -> None:
    global _current
    _current = runtime


def current_runtime() -> WorkerRuntime:
    if _current is None:
        raise RuntimeError("worker runtime not installed: run jobs through `spasemsr worker`")
    return _current
