"""Per-owner index of jobs, newest first (``GET /v1/jobs``, ``GET /v1/predictions``).

Each caller lists only its own jobs, and the job records have no index by owner; this sorted
set (job id -> creation time) per owner is written in the same transaction as the job itself
(``core.submission``). A prediction also keeps a small JSON note of what the Replicate client
sent (its ``input`` object and ``version``), which the job record has no field for. Both
expire with the job records; an entry whose record is gone is dropped when a listing meets it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

from redis import Redis
from redis.client import Pipeline

from core.errors import JobNotFound
from core.jobs import JobRecord
from core.records import JobStore
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


class OwnedJobs:
    def __init__(self, connection: Redis, *, prefix: str, ttl_seconds: int) -> None:
        self._redis = connection
        self._prefix = prefix
        self._ttl_seconds = ttl_seconds

    def _index(self, owner: str) -> str:
        return f"{self._prefix}:owned:{owner}"

    def _note(self, job_id: str) -> str:
        return f"{self._prefix}:prediction:{job_id}"

    def stage(self, pipe: Pipeline, owner: str, job_id: str, created: float) -> None:
        """Queue the index entry on ``pipe`` (the caller's transaction)."""
        pipe.zadd(self._index(owner), {job_id: created})
        pipe.expire(self._index(owner), self._ttl_seconds)

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

    def records(
        self, jobs: JobStore, owner: str, *, after: Cursor | None, limit: int
    ) -> tuple[list[JobRecord], Cursor | None]:
        """One page of the owner's job records, newest first, and the cursor of the next page
        (``None`` on the last one). Index entries of expired records are dropped."""
        page = self.page(owner, after=after, limit=limit)
        found = []
        for job_id, _score in page:
            try:
                found.append(jobs.get(job_id))
            except JobNotFound:
                self.drop(owner, job_id)
        following = Cursor(page[-1][1], page[-1][0]) if len(page) == limit else None
        return found, following


def _pairs(rows: object) -> list[tuple[str, float]]:
    """A ``WITHSCORES`` reply as (member, score) pairs (redis-py's stubs type it loosely)."""
    return [(text(member), float(score)) for member, score in cast(list[tuple[Any, Any]], rows)]
