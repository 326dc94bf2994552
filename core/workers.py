"""Live workers and the model each one serves, announced in Redis with a time-to-live.

A worker refreshes its entry from a heartbeat thread; an entry that is not refreshed expires,
so the API's ``/readyz`` and ``GET /v1/model`` only ever see workers that are alive.
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel
from redis import Redis


class WorkerState(StrEnum):
    WARMING = "warming"
    IDLE = "idle"
    BUSY = "busy"


class ModelInfo(BaseModel):
    """What a worker serves (mirrors ``model.upscaler.ModelCard`` without importing the model)."""

    name: str
    version: str
    configuration: str
    weights: str
    trained: bool
    device: str
    dtype: str
    description: str = ""


class WorkerInfo(BaseModel):
    name: str
    state: WorkerState
    model: ModelInfo | None = None
    pid: int
    hostname: str
    started_at: datetime
    warmup_seconds: float | None = None


class WorkerRegistry:
    def __init__(self, connection: Redis, *, prefix: str) -> None:
        self._redis = connection
        self._prefix = f"{prefix}:worker:"

    def announce(self, info: WorkerInfo, *, ttl_seconds: float) -> None:
        self._redis.set(
            self._prefix + info.name, info.model_dump_json(), px=int(ttl_seconds * 1000)
        )

    def remove(self, name: str) -> None:
        self._redis.delete(self._prefix + name)

    def live(self) -> list[WorkerInfo]:
        keys = sorted(self._redis.scan_iter(match=self._prefix + "*", count=200))
        if not keys:
            return []
        values = self._redis.mget(keys)
        return [WorkerInfo.model_validate(json.loads(v)) for v in values if v is not None]

    def warm(self) -> list[WorkerInfo]:
        return [w for w in self.live() if w.state is not WorkerState.WARMING and w.model]
