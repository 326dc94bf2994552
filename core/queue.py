"""The job queue: RQ with its JSON serializer and three priorities.

The API enqueues by the task's dotted name, so it never imports the worker (or torch).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from redis import Redis
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, cancel_job
from rq.serializers import JSONSerializer

from core.jobs import JobPayload, Priority

TASK = "worker.tasks.run_job"
WEBHOOK_TASK = "worker.webhooks.deliver_job_webhook"
PRIORITY_ORDER = (Priority.HIGH, Priority.DEFAULT, Priority.LOW)


class JobQueue:
    def __init__(self, connection: Redis, *, prefix: str) -> None:
        self._redis = connection
        self._queues = {
            priority: Queue(
                f"{prefix}-{priority.value}", connection=connection, serializer=JSONSerializer
            )
            for priority in PRIORITY_ORDER
        }
        self._webhooks = Queue(
            f"{prefix}-webhooks", connection=connection, serializer=JSONSerializer
        )

    def queue(self, priority: Priority) -> Queue:
        return self._queues[priority]

    def queues_for(self, priorities: tuple[str, ...]) -> list[Queue]:
        """RQ queues in the order a worker should serve them (highest priority first)."""
        wanted = {Priority(name) for name in priorities}
        # Webhook deliveries come last: short HTTP calls that never delay a waiting image.
        return [self._queues[p] for p in PRIORITY_ORDER if p in wanted] + [self._webhooks]

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
        """Queue a job; a retry uses its own queue entry id and may wait ``delay_seconds``."""
        queue = self._queues[priority]
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
        else:
            queue.enqueue_job(job)

    def position(self, job_id: str, priority: Priority) -> int | None:
        """0-based place in line across priorities: jobs of higher queues go first."""
        own = self._queues[priority].get_job_position(job_id)
        if own is None:
            return None
        ahead = sum(self._queues[p].count for p in PRIORITY_ORDER[: PRIORITY_ORDER.index(priority)])
        return int(ahead + own)

    def cancel(self, job_id: str) -> None:
        """Take a queued job off its queue; a job RQ no longer knows is already gone."""
        try:
            cancel_job(job_id, connection=self._redis, serializer=JSONSerializer)
        except (NoSuchJobError, InvalidJobOperation):
            return

    def oldest_enqueued_at(self, priority: Priority) -> datetime | None:
        """When the job at the head of a queue was enqueued (``None`` for an empty queue)."""
        head = self._queues[priority].get_job_ids(0, 1)
        if not head:
            return None
        job = self.fetch(head[0])
        if job is None or job.enqueued_at is None:
            return None
        enqueued = job.enqueued_at
        return enqueued if enqueued.tzinfo else enqueued.replace(tzinfo=UTC)

    def depth(self) -> dict[Priority, int]:
        return {p: int(q.count) for p, q in self._queues.items()}

    def fetch(self, job_id: str) -> Job | None:
        try:
            return Job.fetch(job_id, connection=self._redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return None
