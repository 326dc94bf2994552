"""Live workers and the model each one serves, announced in Redis with a time-to-live.

A worker refreshes its entry from a heartbeat thread; an entry that is not refreshed expires,
so the API's ``/readyz`` and ``GET /v1/model`` only ever see workers that are alive.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel
from redis import Redis

from core.models import ModelName
from core.redis_conn import text


class WorkerState(StrEnum):
    WARMING = "warming"
    IDLE = "idle"
    BUSY = "busy"


class ModelInfo(BaseModel):
    """A model a worker serves (mirrors ``model.upscaler.ModelCard`` without importing the
    model package)."""

    name: ModelName
    version: str
    configuration: str
    weights: str
    """Where the weights came from, in words (never a server path)."""
    trained: bool
    device: str
    dtype: str
    description: str = ""
    source: str = ""
    licence: str = ""
    scales: tuple[int, ...] = (2, 4)


class WorkerInfo(BaseModel):
    name: str
    state: WorkerState
    serving: tuple[ModelName, ...] = ()
    """The models this worker holds (or is warming): announced before they are loaded."""
    models: list[ModelInfo] = []
    """What each warm model is; empty while warming."""
    pid: int
    hostname: str
    started_at: datetime
    warmup_seconds: float | None = None


class WorkerRegistry:
    """Entries with a TTL, indexed by a sorted set of names scored by expiry time.

    Reads never scan the keyspace: they take the names whose expiry is still ahead and fetch
    those entries; names of expired entries are pruned as they are seen.
    """

    def __init__(self, connection: Redis, *, prefix: str) -> None:
        self._redis = connection
        self._prefix = f"{prefix}:worker:"
        self._index = f"{prefix}:workers"

    def announce(self, info: WorkerInfo, *, ttl_seconds: float) -> None:
        with self._redis.pipeline() as pipe:
            pipe.set(self._prefix + info.name, info.model_dump_json(), px=int(ttl_seconds * 1000))
            pipe.zadd(self._index, {info.name: time.time() + ttl_seconds})
            pipe.execute()

    def remove(self, name: str) -> None:
        with self._redis.pipeline() as pipe:
            pipe.delete(self._prefix + name)
            pipe.zrem(self._index, name)
            pipe.execute()

    def live(self) -> list[WorkerInfo]:
        now = time.time()
        self._redis.zremrangebyscore(self._index, "-inf", now)
        names = sorted(text(n) for n in self._redis.zrangebyscore(self._index, now, "+inf"))
        if not names:
            return []
        values = self._redis.mget([self._prefix + name for name in names])
        return [WorkerInfo.model_validate(json.loads(v)) for v in values if v is not None]

    def warm(self) -> list[WorkerInfo]:
        return [w for w in self.live() if w.state is not WorkerState.WARMING and w.models]
