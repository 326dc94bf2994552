"""The job queue: RQ with its JSON serializer, one queue per model and priority.

The API enqueues by the task's dotted name, so it never imports the worker (or torch). Queue
names are ``<prefix>-<model>-<priority>`` (e.g. ``spasemsr-realesrgan-x4plus-high``), so a
worker serves exactly the models it holds warm, and an autoscaler can read one model's queues.

Admission to a model's line is atomic across API processes: ``admit`` checks the age of the
model's oldest queued job, counts its queued jobs plus the places reserved by uploads still
being stored, and reserves one only below the cap, all in one script (one round trip); the
job's entry (``stage_entry``, in the caller's transaction) turns its place into its queue entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from typing import Any

from redis import Redis
from redis.client import Pipeline
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, cancel_job
from rq.serializers import JSONSerializer
from rq.utils import utcparse

from core.jobs import JobPayload, Priority
from core.models import ALL_MODELS, ModelName
from core.redis_conn import text

TASK = "worker.tasks.run_job"
WEBHOOK_TASK = "worker.webhooks.deliver_job_webhook"
PRIORITY_ORDER = (Priority.HIGH, Priority.DEFAULT, Priority.LOW)

QueueKey = tuple[ModelName, Priority]

ADMISSION_HOLD_SECONDS = 60
"""How long a reserved place waits for its job's enqueue: longer than storing any upload, and
the most a crashed API process's places can hold back others."""

# RQ's ``enqueued_at`` (``2024-05-01T12:00:00.123456Z``, UTC) as Unix seconds, or nil.
_LUA_EPOCH = """
local function epoch(stamp)
  local y, mo, d, h, mi, sec = string.match(
    stamp, '^(%d+)-(%d+)-(%d+)T(%d+):(%d+):(%d+%.?%d*)Z?$')
  if not y then return nil end
  y, mo = tonumber(y), tonumber(mo)
  if mo <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((mo + 9) % 12) + 2) / 5) + tonumber(d) - 1
  local days = era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return (days - 719468) * 86400 + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(sec)
end
"""
"""Days from the civil date (the proleptic Gregorian algorithm of Howard Hinnant's
``days_from_civil``): Lua in Redis has no date functions."""

# KEYS[1]: the model's reserved places (sorted set: job id -> expiry in ms, Redis clock, so API
# hosts' clocks do not matter); KEYS[2..]: its RQ queue lists, then, with a claim, the key to
# claim with the place (an Idempotency-Key). ARGV: cap, job id, hold (ms), the oldest enqueue
# time a queue head may have (Unix seconds, the API's clock, as RQ's stamps are), RQ's job key
# prefix, the claim's value ('' for no claim) and lifetime (s). One script: no other API
# process can count or reserve between our count and our reservation, and all the checks cost
# one round trip. The heads' job hashes are not in KEYS: one Redis (RQ needs one) has them all.
_ADMIT = (
    _LUA_EPOCH
    + """
local claiming = ARGV[6] ~= ''
local last_queue = claiming and #KEYS - 1 or #KEYS
local oldest = nil
for i = 2, last_queue do
  local head = redis.call('LINDEX', KEYS[i], 0)
  if head then
    local stamp = redis.call('HGET', ARGV[5] .. head, 'enqueued_at')
    local seconds = stamp and epoch(stamp)
    if seconds and (oldest == nil or seconds < oldest) then oldest = seconds end
  end
end
if oldest and oldest < tonumber(ARGV[4]) then return {2, string.format('%.6f', oldest)} end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local depth = redis.call('ZCARD', KEYS[1])
for i = 2, last_queue do depth = depth + redis.call('LLEN', KEYS[i]) end
if depth >= tonumber(ARGV[1]) then return {0, depth} end
if claiming then
  local earlier = redis.call('GET', KEYS[#KEYS])
  if earlier then return {3, earlier} end
  redis.call('SET', KEYS[#KEYS], ARGV[6], 'EX', ARGV[7])
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, depth}
"""
)


class Outcome(IntEnum):
    """What ``admit`` decided (the first number of the script's answer)."""

    FULL = 0
    ADMITTED = 1
    TOO_OLD = 2
    CLAIMED_BEFORE = 3


@dataclass(frozen=True)
class Claim:
    """A key set, only if it is not set yet, together with the reservation of a place."""

    key: str
    value: str
    ttl_seconds: int


@dataclass(frozen=True)
class Admission:
    outcome: Outcome
    depth: int = 0
    """FULL: the depth that refused the job; ADMITTED: the depth before it."""
    oldest_enqueued: float | None = None
    """TOO_OLD: when the model's oldest queued job was enqueued (Unix seconds)."""
    earlier_claim: str | None = None
    """CLAIMED_BEFORE: the value an earlier request claimed the key with."""


PositionReader = Callable[[Sequence[Any]], int]
"""Computes a staged entry's place in line from its transaction's answers."""


def queue_name(prefix: str, model: ModelName, priority: Priority) -> str:
    return f"{prefix}-{model.value}-{priority.value}"


class JobQueue:
    def __init__(self, connection: Redis, *, prefix: str) -> None:
        self._redis = connection
        self._prefix = prefix
        self._admit = connection.register_script(_ADMIT)
        self._queues: dict[QueueKey, Queue] = {
            (model, priority): Queue(
                queue_name(prefix, model, priority),
                connection=connection,
                serializer=JSONSerializer,
            )
            for model in ALL_MODELS
            for priority in PRIORITY_ORDER
        }
        self._webhooks = Queue(
            f"{prefix}-webhooks", connection=connection, serializer=JSONSerializer
        )

    def queue(self, model: ModelName, priority: Priority) -> Queue:
        return self._queues[(model, priority)]

    def queues_for(self, models: Iterable[ModelName], priorities: tuple[str, ...]) -> list[Queue]:
        """RQ queues in the order a worker should serve them: priority first, then model.

        A worker holding several models takes every model's high-priority jobs before any
        default one. Webhook deliveries come last: short HTTP calls that never delay an image.
        """
        wanted = {Priority(name) for name in priorities}
        held = list(dict.fromkeys(models))
        ordered = [self._queues[(m, p)] for p in PRIORITY_ORDER if p in wanted for m in held]
        return [*ordered, self._webhooks]

    def enqueue_webhook(self, job_id: str, *, retry_intervals: tuple[int, ...]) -> None:
        self._webhooks.enqueue_call(
            WEBHOOK_TASK,
            args=(job_id,),
            timeout=60,
            result_ttl=3600,
            failure_ttl=7 * 24 * 3600,
            retry=Retry(max=len(retry_intervals), interval=list(retry_intervals))
            if retry_intervals
            else None,
            description=f"webhook for job {job_id}",
        )

    def enqueue(
        self,
        payload: JobPayload,
        priority: Priority,
        *,
        timeout_seconds: int,
        keep_seconds: int,
        rq_job_id: str | None = None,
        delay_seconds: float = 0.0,
    ) -> None:
        """Queue a job on its model's queue; a retry uses its own queue entry id and may wait
        ``delay_seconds``."""
        if delay_seconds > 0:
            queue = self._queues[(_model_of(payload), priority)]
            job = self._create_job(queue, payload, timeout_seconds, keep_seconds, rq_job_id)
            queue.schedule_job(job, datetime.now(UTC) + timedelta(seconds=delay_seconds))
            return
        with self._redis.pipeline() as pipe:  # MULTI: the entry replaces the job's reserved place
            pipe.multi()
            self.stage_entry(
                pipe,
                payload,
                priority,
                timeout_seconds=timeout_seconds,
                keep_seconds=keep_seconds,
                rq_job_id=rq_job_id,
            )
            pipe.execute()

    def stage_entry(
        self,
        pipe: Pipeline,
        payload: JobPayload,
        priority: Priority,
        *,
        timeout_seconds: int,
        keep_seconds: int,
        rq_job_id: str | None = None,
    ) -> PositionReader:
        """Queue on ``pipe`` the job's RQ entry, exactly as ``Queue.enqueue_job`` writes it,
        the end of its reserved place, and the lengths its place in line is read from: the
        entry goes to the tail of its queue, so inside the transaction its place is the
        lengths of the higher priorities' queues plus its own queue's, less one.

        ``pipe`` must be a transaction begun with ``pipe.multi()`` before its first command
        (RQ begins one itself only on an empty pipeline)."""
        model = _model_of(payload)
        queue = self._queues[(model, priority)]
        job = self._create_job(queue, payload, timeout_seconds, keep_seconds, rq_job_id)
        queue.enqueue_job(job, pipeline=pipe)
        pipe.zrem(self._reservations_key(model), payload.job_id)
        first = len(pipe)
        pipe.llen(queue.key)
        for higher in PRIORITY_ORDER[: PRIORITY_ORDER.index(priority)]:
            pipe.llen(self._queues[(model, higher)].key)
        last = len(pipe)

        def position(answers: Sequence[Any]) -> int:
            own, *ahead = answers[first:last]
            return int(own) - 1 + sum(int(count) for count in ahead)

        return position

    def stage_withdrawal(
        self, pipe: Pipeline, job_id: str, model: ModelName, priority: Priority
    ) -> None:
        """Queue on ``pipe`` the removal of whatever ``stage_entry`` may have written for a job
        that is not accepted after all (its transaction's answer was lost), and of its place."""
        pipe.lrem(self._queues[(model, priority)].key, 0, job_id)
        pipe.delete(Job.key_for(job_id))
        pipe.zrem(self._reservations_key(model), job_id)

    @staticmethod
    def _create_job(
        queue: Queue,
        payload: JobPayload,
        timeout_seconds: int,
        keep_seconds: int,
        rq_job_id: str | None,
    ) -> Job:
        return queue.create_job(
            TASK,
            args=(payload.model_dump(mode="json"),),
            job_id=rq_job_id or payload.job_id,
            timeout=timeout_seconds,
            result_ttl=keep_seconds,
            failure_ttl=keep_seconds,
            description=f"upscale job {payload.job_id}",
        )

    def _reservations_key(self, model: ModelName) -> str:
        return f"{self._prefix}:admission:{model.value}"

    def admit(
        self,
        model: ModelName,
        job_id: str,
        *,
        cap: int,
        oldest_allowed: float,
        claim: Claim | None = None,
    ) -> Admission:
        """Reserve a place in ``model``'s line for ``job_id`` unless the model's oldest queued
        job was enqueued before ``oldest_allowed`` (Unix seconds) or ``cap`` jobs are queued or
        reserved (every priority, every API process); with ``claim``, only if its key is not
        set yet, which it then sets. One round trip. The job's entry (``stage_entry``) or its
        withdrawal (``stage_withdrawal``) gives the place back; a place not given back expires
        after ``ADMISSION_HOLD_SECONDS``."""
        keys = [self._reservations_key(model)]
        keys += [self._queues[(model, p)].key for p in PRIORITY_ORDER]
        args: list[Any] = [cap, job_id, ADMISSION_HOLD_SECONDS * 1000, repr(oldest_allowed)]
        args += [Job.redis_job_namespace_prefix, "", 0]
        if claim is not None:
            keys.append(claim.key)
            args[-2:] = [claim.value, claim.ttl_seconds]
        code, value = self._admit(keys=keys, args=args)
        outcome = Outcome(int(code))
        if outcome is Outcome.TOO_OLD:
            return Admission(outcome, oldest_enqueued=float(text(value)))
        if outcome is Outcome.CLAIMED_BEFORE:
            return Admission(outcome, earlier_claim=text(value))
        return Admission(outcome, depth=int(value))

    def position(self, job_id: str, model: ModelName, priority: Priority) -> int | None:
        """0-based place in line among the model's jobs: higher priorities go first."""
        own = self._queues[(model, priority)].get_job_position(job_id)
        if own is None:
            return None
        higher = PRIORITY_ORDER[: PRIORITY_ORDER.index(priority)]
        ahead = sum(self._queues[(model, p)].count for p in higher)
        return int(ahead + own)

    def cancel(self, job_id: str) -> None:
        """Take a queued job off its queue; a job RQ no longer knows is already gone."""
        try:
            cancel_job(job_id, connection=self._redis, serializer=JSONSerializer)
        except (NoSuchJobError, InvalidJobOperation):
            return

    def depths(self) -> dict[QueueKey, int]:
        """Jobs waiting in every queue, read in one round trip."""
        with self._redis.pipeline(transaction=False) as pipe:
            for queue in self._queues.values():
                pipe.llen(queue.key)
            counts = pipe.execute()
        return {key: int(count) for key, count in zip(self._queues, counts, strict=True)}

    def total_depth(self) -> int:
        return sum(self.depths().values())

    def oldest_enqueued(self) -> dict[QueueKey, datetime | None]:
        """When the job at the head of each queue was enqueued (``None`` for an empty queue),
        in two round trips whatever the number of queues."""
        with self._redis.pipeline(transaction=False) as pipe:
            for queue in self._queues.values():
                pipe.lindex(queue.key, 0)
            heads = pipe.execute()
        ids = {key: text(head) for key, head in zip(self._queues, heads, strict=True) if head}
        oldest: dict[QueueKey, datetime | None] = dict.fromkeys(self._queues)
        if not ids:
            return oldest
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids.values():
                pipe.hget(Job.key_for(job_id), "enqueued_at")
            stamps = pipe.execute()
        for key, stamp in zip(ids, stamps, strict=True):
            oldest[key] = _parse_stamp(stamp)
        return oldest

    def entries_in_line(self) -> set[str]:
        """Every queue entry id some worker can still take: waiting in a queue, moved to RQ's
        intermediate list by a worker that has not started it yet, or scheduled for later.

        One round trip; the recovery sweep compares queued job records against this.
        """
        with self._redis.pipeline(transaction=False) as pipe:
            for queue in self._queues.values():
                pipe.lrange(queue.key, 0, -1)
                pipe.lrange(queue.intermediate_queue_key, 0, -1)
                pipe.zrange(f"rq:scheduled:{queue.name}", 0, -1)  # ScheduledJobRegistry's key
            answers = pipe.execute()
        return {text(entry) for answer in answers for entry in answer}

    def fetch(self, job_id: str) -> Job | None:
        try:
            return Job.fetch(job_id, connection=self._redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return None


def _model_of(payload: JobPayload) -> ModelName:
    model = payload.parameters.model
    if model is None:
        raise ValueError(f"job {payload.job_id} names no model; the API fills in the default")
    return model


def _parse_stamp(stamp: object) -> datetime | None:
    if not stamp:
        return None
    try:
        return utcparse(text(stamp))
    except ValueError:
        return None
