"""Worker entry point: load the upscaler once, warm it, then take jobs without forking."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import uuid
from types import FrameType
from typing import Any

from rq import SimpleWorker
from rq.serializers import JSONSerializer

from core.jobs import utcnow
from core.models import worker_models
from core.queue import JobQueue
from core.records import JobStore
from core.recovery import JobRecovery
from core.redis_conn import connect_redis
from core.settings import Settings
from core.storage import build_storage
from core.workers import WorkerInfo, WorkerRegistry, WorkerState
from worker.engine import load_upscalers
from worker.metrics import WorkerMetrics, install_metrics
from worker.runtime import Heartbeat, WorkerRuntime, install_runtime

logger = logging.getLogger(__name__)


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def run_worker(settings: Settings, *, burst: bool = False) -> None:
    """Serve jobs until stopped (SIGTERM/SIGINT finish the current job first)."""
    connection = connect_redis(settings)
    prefix = settings.redis.key_prefix
    name = settings.worker.name or default_worker_name()
    registry = WorkerRegistry(connection, prefix=prefix)
    served = worker_models(settings)
    metrics = WorkerMetrics(served)
    install_metrics(metrics)
    metrics.serve(settings.worker)  # up while warming: spasemsr_model_warm 0 until it is done
    registry.announce(
        WorkerInfo(
            name=name,
            state=WorkerState.WARMING,
            serving=served,
            pid=os.getpid(),
            hostname=socket.gethostname(),
            started_at=utcnow(),
        ),
        # Long enough for loading, compiling and CUDA-graph capture at full size.
        ttl_seconds=max(1800.0, 3 * settings.worker.heartbeat_seconds),
    )
    began = time.perf_counter()
    upscalers = load_upscalers(settings)
    for upscaler in upscalers.values():
        upscaler.warm_up()
        card = upscaler.card
        metrics.mark_warm(card)
        logger.info(
            "worker %s: %s warm (%s, %s, %s)%s",
            name, card.name, card.configuration, card.device, card.dtype,
            "" if card.trained else " -- UNTRAINED weights",
        )  # fmt: skip
    warmup_seconds = time.perf_counter() - began
    logger.info("worker %s warm in %.2f s", name, warmup_seconds)
    jobs = JobStore(connection, prefix=prefix, ttl_seconds=settings.worker.record_ttl_seconds)
    queue = JobQueue(connection, prefix=prefix)
    runtime = WorkerRuntime(
        settings=settings,
        name=name,
        upscalers=upscalers,
        storage=build_storage(settings),
        jobs=jobs,
        registry=registry,
        warmup_seconds=warmup_seconds,
        queue=queue,
        recovery=JobRecovery(
            connection,
            prefix=prefix,
            jobs=jobs,
            queue=queue,
            registry=registry,
            max_attempts=settings.worker.max_attempts,
            backoff_seconds=settings.worker.retry_backoff_seconds,
            job_timeout_seconds=settings.worker.job_timeout_seconds,
            keep_seconds=settings.worker.record_ttl_seconds,
            orphan_grace_seconds=settings.worker.orphan_grace_seconds,
        ),
    )
    install_runtime(runtime)
    runtime.announce()
    heartbeat = Heartbeat(runtime)
    heartbeat.start()
    worker = ServingWorker(
        runtime,
        queue.queues_for(served, settings.worker.queues),
        connection=connection,
        serializer=JSONSerializer,
        name=name,
    )
    try:
        # The scheduler re-enqueues delayed retries (webhook backoff, requeued jobs); RQ
        # elects one scheduler per Redis among the workers.
        worker.work(burst=burst, with_scheduler=True, logging_level="INFO")
    finally:
        heartbeat.stopped.set()
        registry.remove(name)
        metrics.mark_cold()
        metrics.stop()
        logger.info("worker %s stopped", name)


class ServingWorker(SimpleWorker):
    """RQ's in-process worker, with a shutdown grace period for the job it is running.

    First SIGTERM/SIGINT: take no new job; the current one may finish within
    ``shutdown_grace_seconds``, after which it is handed back to the queue at its next step.
    A second signal hands it back at once.
    """

    def __init__(self, runtime: WorkerRuntime, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runtime = runtime

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.runtime.begin_shutdown()
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]
        # RQ's second-signal handler raises SystemExit mid-job; ours hands the job back first.
        signal.signal(signal.SIGINT, self._hand_back_now)
        signal.signal(signal.SIGTERM, self._hand_back_now)

    def _hand_back_now(self, signum: int, frame: FrameType | None) -> None:
        self.runtime.begin_shutdown(immediately=True)


__all__ = ["run_worker"]
