"""The API's handles on the backing services, built once per process in the lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from redis import Redis

from app.uploads import check_image
from core.limits import IdempotencyKeys, RateLimiter
from core.queue import JobQueue
from core.records import JobStore
from core.settings import Settings
from core.storage import ObjectStorage
from core.submission import SubmissionService
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
    submissions: SubmissionService = field(init=False)
    """Uploads' checks and writes, over the handles above (built from them, not passed)."""

    def __post_init__(self) -> None:
        submissions = SubmissionService(
            settings=self.settings,
            redis=self.redis,
            storage=self.storage,
            jobs=self.jobs,
            queue=self.queue,
            workers=self.workers,
            idempotency=self.idempotency,
            check_image=check_image,
        )
        object.__setattr__(self, "submissions", submissions)  # frozen: set once, here


async def _services(request: Request) -> Services:
    # ``async``: a plain attribute read, which FastAPI would otherwise send to its thread pool.
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(_services)]
