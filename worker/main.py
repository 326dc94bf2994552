"""Worker entry point: load the upscaler once, warm it, then take jobs without forking."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid

from rq import SimpleWorker
from rq.serializers import JSONSerializer

from core.jobs import utcnow
from core.queue import JobQueue
from core.records import JobStore
from core.redis_conn import connect_redis
from core.settings import Settings
from core.storage import build_storage
from core.workers import WorkerInfo, WorkerRegistry, WorkerState
from worker.engine import load_upscaler
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
    registry.announce(
        WorkerInfo(
            name=name,
            state=WorkerState.WARMING,
            pid=os.getpid(),
            hostname=socket.gethostname(),
            started_at=utcnow(),
        ),
        ttl_seconds=max(60.0, 3 * settings.worker.heartbeat_seconds),
    )
    began = time.perf_counter()
    upscaler = load_upscaler(settings)
    upscaler.warm_up()
    warmup_seconds = time.perf_counter() - began
    card = upscaler.card
    logger.info(
        "worker %s warm in %.2f s: %s (%s, %s, %s)%s",
        name, warmup_seconds, card.name, card.configuration, card.device, card.dtype,
        "" if card.trained else " -- UNTRAINED weights",
    )  # fmt: skip
    runtime = WorkerRuntime(
        settings=settings,
        name=name,
        upscaler=upscaler,
        storage=build_storage(settings),
        jobs=JobStore(connection, prefix=prefix, ttl_seconds=settings.worker.record_ttl_seconds),
        registry=registry,
        warmup_seconds=warmup_seconds,
    )
    install_runtime(runtime)
    runtime.announce()
    heartbeat = Heartbeat(runtime)
    heartbeat.start()
    queue = JobQueue(connection, prefix=prefix)
    worker = SimpleWorker(
        queue.queues_for(settings.worker.queues),
        connection=connection,
        serializer=JSONSerializer,
        name=name,
    )
    try:
        worker.work(burst=burst, with_scheduler=False, logging_level="INFO")
    finally:
        heartbeat.stopped.set()
        registry.remove(name)
        logger.info("worker %s stopped", name)


__all__ = ["run_worker"]
