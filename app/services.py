"""The API's handles on the backing services, built once per process in the lifespan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from redis import Redis

from core.limits import IdempotencyKeys, RateLimiter
from core.queue import JobQueue
from core.records import JobStore
from core.settings import Settings
from core.storage import ObjectStorage
from core.workers import WorkerRegistry


@dataclass(frozen=True)
class Services:
    settings: Settings
    redis: Redis
    storage: ObjectStorage
    jobs: JobStore
    queue: JobQueue
    workers: WorkerRegistry
    limiter: RateLimiter
    idempotency: IdempotencyKeys


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(_services)]
