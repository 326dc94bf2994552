"""Per-owner index of jobs created through the Replicate-compatible routes, newest first.

``GET /v1/predictions`` lists only the caller's own predictions, and the job records have no
index by owner; this sorted set (job id -> creation time) per owner is written when the
prediction is created, beside a small JSON note of what the Replicate client sent (its
``input`` object and ``version``), which the job record has no field for. Both expire with the
job records; an entry whose record is gone is dropped when a listing meets it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

from redis import Redis

from core.redis_conn import text


@dataclass(frozen=True)
class Cursor:
    """Where a page ends: the last entry's score and id (equal scores are ordered by id)."""

    score: float
    job_id: str

    def encode(self) -> str:
        return f"{self.score!r}:{self.job_id}"

    @classmethod
    def decode(cls, raw: str) -> Cursor | None:
        score, _, job_id = raw.partition(":")
        try:
            return cls(float(score), job_id) if job_id else None
        except ValueError:
            return None


class OwnedPredictions:
    def __init__(self, connection: Redis, *, prefix: str, ttl_seconds: int) -> None:
        self._redis = connection
        self._prefix = prefix
        self._ttl_seconds = ttl_seconds

    def _index(self, owner: str) -> str:
        return f"{self._prefix}:owned:{owner}"

    def _note(self, job_id: str) -> str:
        return f"{self._prefix}:prediction:{job_id}"

    def add(self, owner: str, job_id: str, created: float, note: dict[str, Any]) -> None:
        """Index the job under its owner and keep its note, in one round trip."""
        with self._redis.pipeline() as pipe:
            pipe.zadd(self._index(owner), {job_id: created})
            pipe.expire(self._index(owner), self._ttl_seconds)
            pipe.set(self._note(job_id), json.dumps(note), ex=self._ttl_seconds)
            pipe.execute()

    def note(self, job_id: str) -> dict[str, Any]:
        """What the client sent for this prediction (empty for a job made by ``/v1/jobs``)."""
        raw = self._redis.get(self._note(job_id))
        found = json.loads(text(raw)) if raw is not None else {}
        return found if isinstance(found, dict) else {}

    def page(self, owner: str, *, after: Cursor | None, limit: int) -> list[tuple[str, float]]:
        """Up to ``limit`` (job id, score) pairs, newest first, strictly after ``after``."""
        key = self._index(owner)
        if after is None:
            rows = self._redis.zrevrangebyscore(key, "+inf", "-inf", 0, limit, withscores=True)
            return _pairs(rows)
        # Same score as the cursor: Redis orders those by member, descending.
        ties = self._redis.zrevrangebyscore(key, after.score, after.score, withscores=True)
        found = [pair for pair in _pairs(ties) if pair[0] < after.job_id][:limit]
        if len(found) < limit:
            below = f"({after.score!r}"
            rest = limit - len(found)
            rows = self._redis.zrevrangebyscore(key, below, "-inf", 0, rest, withscores=True)
            found += _pairs(rows)
        return found

    def drop(self, owner: str, job_id: str) -> None:
        self._redis.zrem(self._index(owner), job_id)


def _pairs(rows: object) -> list[tuple[str, float]]:
    """A ``WITHSCORES`` reply as (member, score) pairs (redis-py's stubs type it loosely)."""
    return [(text(member), float(score)) for member, score in cast(list[tuple[Any, Any]], rows)]
