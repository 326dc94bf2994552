"""Job records in Redis: one hash per job, one JSON value per field, atomic state transitions.

The queue (RQ) only carries work; this record is what clients see. Each field is written on
its own so the worker's progress updates never overwrite the API's changes, and every status
change goes through one Lua script that checks the current status first, so a cancel and a
worker start cannot both win.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from redis import Redis
from redis.client import Pipeline

from core.errors import JobNotFound
from core.jobs import JobRecord, JobStatus
from core.redis_conn import text

_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return -1 end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[4] then return 0 end
local allowed = cjson.decode(ARGV[1])
for _, status in ipairs(allowed) do
  if current == status then
    redis.call('HSET', KEYS[1], 'status', ARGV[2])
    for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
    if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
    if ARGV[2] == ARGV[5] then
      local now = redis.call('TIME')
      redis.call('ZADD', KEYS[2], tonumber(now[1]) + tonumber(now[2]) / 1e6, ARGV[6])
    else
      redis.call('ZREM', KEYS[2], ARGV[6])
    end
    return 1
  end
end
return 0
"""
"""Status change and queued-index update in one step. ``KEYS``: the record, the queued index;
``ARGV``: allowed statuses, new status, TTL, holder, the queued status, job id, field pairs."""

CANCEL_FIELD = "cancel_requested"


class JobStore:
    """Job records, and an index of the queued ones (job id -> when it entered the queue).

    The index is what makes "nothing accepted is lost" checkable: a job whose record says
    ``queued`` but that no queue, delay set or schedule holds any more (a worker popped it and
    stopped before starting it) is found from here by the recovery sweep and queued again.
    """

    def __init__(self, connection: Redis, *, prefix: str, ttl_seconds: int) -> None:
        self._redis = connection
        self._prefix = prefix
        self._ttl_seconds = ttl_seconds
        self._transition = connection.register_script(_TRANSITION)
        self.queued_index_key = f"{prefix}:queued"

    def _key(self, job_id: str) -> str:
        return f"{self._prefix}:job:{job_id}"

    def create(self, record: JobRecord, *, pipeline: Pipeline | None = None) -> None:
        """Write the record (and enter a queued one in the queued index) in one transaction;
        with ``pipeline``, the writes are queued on it, to be part of the caller's."""
        if pipeline is not None:
            self._stage_create(pipeline, record)
            return
        with self._redis.pipeline() as pipe:
            self._stage_create(pipe, record)
            pipe.execute()

    def _stage_create(self, pipe: Pipeline, record: JobRecord) -> None:
        key = self._key(record.id)
        pipe.hset(key, mapping=_encode(record.model_dump(mode="json")))
        pipe.expire(key, self._ttl_seconds)
        if record.status is JobStatus.QUEUED:
            pipe.zadd(self.queued_index_key, {record.id: record.created_at.timestamp()})

    def get(self, job_id: str) -> JobRecord:
        raw = self._redis.hgetall(self._key(job_id))
        if not raw:
            raise JobNotFound(f"No job with id {job_id!r} (it may have expired).")
        fields = {text(k): json.loads(v) for k, v in raw.items() if text(k) != CANCEL_FIELD}
        return JobRecord.model_validate(fields)

    def exists(self, job_id: str) -> bool:
        return bool(self._redis.exists(self._key(job_id)))

    def update(self, job_id: str, **fields: Any) -> None:
        """Set fields that do not change the status (progress, timings, details)."""
        self._redis.hset(self._key(job_id), mapping=_encode(fields))

    def transition(
        self,
        job_id: str,
        *,
        from_statuses: Iterable[JobStatus],
        to: JobStatus,
        held_by: str | None = None,
        **fields: Any,
    ) -> bool:
        """Move to ``to`` only from one of ``from_statuses``; returns whether it happened.

        With ``held_by``, only while that worker still holds the job: a worker presumed dead
        whose job was handed to another cannot overwrite the other's outcome.
        """
        allowed = json.dumps([json.dumps(status.value) for status in from_statuses])
        ttl = self._ttl_seconds if to.is_terminal else 0
        holder = json.dumps(held_by) if held_by is not None else ""
        queued = json.dumps(JobStatus.QUEUED.value)
        args: list[Any] = [allowed, json.dumps(to.value), ttl, holder, queued, job_id]
        for name, value in _encode(fields).items():
            args += [name, value]
        keys = [self._key(job_id), self.queued_index_key]
        outcome = self._transition(keys=keys, args=args)
        if outcome == -1:
            raise JobNotFound(f"No job with id {job_id!r} (it may have expired).")
        return bool(outcome == 1)

    def request_cancel(self, job_id: str) -> None:
        self._redis.hset(self._key(job_id), CANCEL_FIELD, "1")

    def cancel_requested(self, job_id: str) -> bool:
        return self._redis.hget(self._key(job_id), CANCEL_FIELD) is not None

    def delete(self, job_id: str, *, pipeline: Pipeline | None = None) -> None:
        """Remove the record and its queued-index entry; with ``pipeline``, queued on it."""
        if pipeline is not None:
            pipeline.delete(self._key(job_id))
            pipeline.zrem(self.queued_index_key, job_id)
            return
        with self._redis.pipeline() as pipe:
            self.delete(job_id, pipeline=pipe)
            pipe.execute()

    def queued_since(self, before: float) -> list[str]:
        """Ids of jobs that entered the queue before ``before`` (Unix seconds), oldest first."""
        raw = self._redis.zrangebyscore(self.queued_index_key, "-inf", before)
        return [text(entry) for entry in raw]

    def drop_from_queued_index(self, job_id: str) -> None:
        """For an entry whose record expired or is no longer queued."""
        self._redis.zrem(self.queued_index_key, job_id)


def _encode(fields: Mapping[str, Any]) -> dict[Any, str]:  # redis-py keys are a wide union
    return {name: json.dumps(_jsonable(value)) for name, value in fields.items()}


def _jsonable(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value
