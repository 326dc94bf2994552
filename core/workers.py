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

# KEYS[1]: the index (name -> expiry, Unix seconds); ARGV: now, the entries' key prefix.
# Prune the expired names and read the live ones' entries in one round trip (the submission
# path asks on every upload). MGET in slices: Lua's unpack has a stack limit. The entries are
# not in KEYS (their names are only known here): one Redis, as RQ needs, has them all.
_LIVE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local names = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')
table.sort(names)
local entries = {}
for first = 1, #names, 500 do
  local keys = {}
  for i = first, math.min(first + 499, #names) do keys[#keys + 1] = ARGV[2] .. names[i] end
  for _, entry in ipairs(redis.call('MGET', unpack(keys))) do entries[#entries + 1] = entry end
end
return entries
"""


class WorkerState(StrEnum):
    WARMING = "warming"
    IDLE = "idle"
    BUSY = "busy"


class ModelInfo(BaseModel):
    """A model a worker serves (mirrors ``model.upscalers.base.ModelCard`` without importing the
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
        self._live = connection.register_script(_LIVE)

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
        """Workers whose entry has not expired, by name; one round trip."""
        values = self._live(keys=[self._index], args=[repr(time.time()), self._prefix])
        return [WorkerInfo.model_validate(json.loads(v)) for v in values if v is not None]

    def warm(self) -> list[WorkerInfo]:
        return [w for w in self.live() if w.state is not WorkerState.WARMING and w.models]
