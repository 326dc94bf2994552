"""The job queue: RQ with its JSON serializer, one queue per model and priority.

The API enqueues by the task's dotted name, so it never imports the worker (or torch). Queue
names are ``<prefix>-<model>-<priority>`` (e.g. ``spasemsr-realesrgan-x4plus-high``), so a
worker serves exactly the models it holds warm, and an autoscaler can read one model's queues.

Admission to a model's line is atomic across API processes: ``reserve`` counts the model's
queued jobs plus the places reserved by uploads still being stored, and reserves one only
below the cap; the job's enqueue turns its place into its queue entry in one transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from redis import Redis
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

# KEYS[1]: the model's reserved places (sorted set: job id -> expiry in ms, Redis clock, so API
# hosts' clocks do not matter); KEYS[2..]: its RQ queue lists. ARGV: cap, job id, hold (ms).
# One script: no other API process can count or reserve between our count and our reservation.
_RESERVE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local depth = redis.call('ZCARD', KEYS[1])
for i = 2, #KEYS do depth = depth + redis.call('LLEN', KEYS[i]) end
if depth >= tonumber(ARGV[1]) then return {0, depth} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, depth}
"""


def queue_name(prefix: str, model: ModelName, priority: Priority) -> str:
    return f"{prefix}-{model.value}-{priority.value}"


class JobQueue:
    def __init__(self, connection: Redis, *, prefix: str) -> None:
        self._redis = connection
        self._prefix = prefix
        self._reserve = connection.register_script(_RESERVE)
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
        queue = self._queues[(_model_of(payload), priority)]
        job = queue.create_job(
            TASK,
            args=(payload.model_dump(mode="json"),),
            job_id=rq_job_id or payload.job_id,
            timeout=timeout_seconds,
            result_ttl=keep_seconds,
            failure_ttl=keep_seconds,
            description=f"upscale job {payload.job_id}",
        )
        if delay_seconds > 0:
            queue.schedule_job(job, datetime.now(UTC) + timedelta(seconds=delay_seconds))
            return
        with self._redis.pipeline() as pipe:  # MULTI: the entry replaces the job's reserved place
            queue.enqueue_job(job, pipeline=pipe)
            pipe.zrem(self._reservations_key(_model_of(payload)), payload.job_id)
            pipe.execute()

    def _reservations_key(self, model: ModelName) -> str:
        return f"{self._prefix}:admission:{model.value}"

    def reserve(self, model: ModelName, job_id: str, *, cap: int) -> int | None:
        """Reserve a place in ``model``'s line for ``job_id`` if fewer than ``cap`` jobs are
        queued or reserved (every priority, every API process); ``None`` when reserved, else
        the depth that refused it. The job's ``enqueue`` (or ``release``) gives it back."""
        keys = [self._queues[(model, p)].key for p in PRIORITY_ORDER]
        admitted, depth = self._reserve(
            keys=[self._reservations_key(model), *keys],
            args=[cap, job_id, ADMISSION_HOLD_SECONDS * 1000],
        )
        return None if int(admitted) == 1 else int(depth)

    def release(self, model: ModelName, job_id: str) -> None:
        """Give back a place that will not be used (nothing happens once the job is queued)."""
        self._redis.zrem(self._reservations_key(model), job_id)

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


class Admission:
    """The place one request reserved in a line: given back when the request ends, unless the
    job's enqueue already turned it into its queue entry."""

    def __init__(self, queue: JobQueue) -> None:
        self._queue = queue
        self._held: tuple[ModelName, str] | None = None

    def reserve(self, model: ModelName, job_id: str, *, cap: int) -> int | None:
        depth = self._queue.reserve(model, job_id, cap=cap)
        if depth is None:
            self._held = (model, job_id)
        return depth

    def release(self) -> None:
        if self._held is not None:
            self._queue.release(*self._held)
            self._held = None
