"""A worker runtime in the test process: the real job store, queue, registry and recovery on a
real Redis, local storage and the Lanczos upscaler (what `worker.main` builds, minus RQ)."""

from __future__ import annotations

from pathlib import Path

from redis import Redis

from core.models import ModelName
from core.queue import JobQueue
from core.records import JobStore
from core.recovery import JobRecovery
from core.settings import Settings
from core.storage import LocalStorage
from core.workers import WorkerRegistry
from model.upscalers.lanczos import LanczosUpscaler
from worker.runtime import WorkerRuntime


def in_process_runtime(
    settings: Settings,
    storage_root: Path,
    *,
    name: str = "test-worker",
    orphan_grace_seconds: float = 30.0,
    **worker: object,
) -> WorkerRuntime:
    """``worker`` overrides fields of the worker settings (backoff, retries, time limits)."""
    settings = settings.model_copy(update={"worker": settings.worker.model_copy(update=worker)})
    connection = Redis.from_url(settings.redis.url or "")
    jobs = JobStore(connection, prefix="spasemsr", ttl_seconds=600)
    queue = JobQueue(connection, prefix="spasemsr")
    registry = WorkerRegistry(connection, prefix="spasemsr")
    return WorkerRuntime(
        settings=settings,
        name=name,
        upscalers={ModelName.LANCZOS: LanczosUpscaler()},
        storage=LocalStorage(storage_root),
        jobs=jobs,
        registry=registry,
        warmup_seconds=0.0,
        queue=queue,
        connection=connection,
        recovery=JobRecovery(
            connection,
            prefix="spasemsr",
            jobs=jobs,
            queue=queue,
            registry=registry,
            max_attempts=3,
            backoff_seconds=settings.worker.retry_backoff_seconds,
            job_timeout_seconds=60,
            keep_seconds=600,
            orphan_grace_seconds=orphan_grace_seconds,
        ),
    )
