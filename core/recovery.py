"""Nothing accepted is lost: jobs of dead workers go back in line, within bounds.

Each worker records the job it runs in one Redis hash (job id -> worker name) and keeps its
registry entry alive from a heartbeat thread. Every worker's heartbeat thread also runs a
sweep (one at a time, under a short lock): a running job whose worker's entry has expired was
lost with that worker, and is queued again under a fresh queue entry after a backoff, unless
it has already taken ``max_attempts`` workers with it, in which case it fails with a clear
error instead of killing workers forever.

The same sweep closes the gap before a job starts: a worker takes an entry off the queue and
only then marks the job running, so a worker stopped in between (SIGTERM to an idle worker
just as a job arrives, a scale-down, a crash) would leave a record that says ``queued`` with no
entry anywhere. Every queued record is in an index (:class:`~core.records.JobStore`); a job
that has been queued longer than ``orphan_grace_seconds`` and has no entry in any queue,
intermediate list, schedule or delay set is queued again under a fresh entry. If the worker
was merely slow and starts the old entry after all, the new entry finds the job no longer
queued and is skipped: at least once, never twice.

A job whose worker finds object storage unavailable (after its short in-process retries) is
handed back the same way, without counting an attempt, to wait in the delay set for
``retry_backoff_seconds`` doubling per hand-back up to ``storage_wait_max_seconds``; it is
held so until storage returns or its queue time-to-live (counted from its acceptance) is over,
and then ends ``failed`` with ``storage-unavailable`` rather than being retried forever.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from redis import Redis

from core.errors import (
    JobCanceled,
    JobError,
    JobNotFound,
    QueueTimeout,
    SpaSemSRError,
    StorageUnavailable,
    WorkerLost,
)
from core.jobs import JobErrorInfo, JobRecord, JobStatus, payload_for, utcnow
from core.queue import JobQueue
from core.records import JobStore
from core.redis_conn import text
from core.storage import ObjectStorage
from core.workers import WorkerRegistry

logger = logging.getLogger(__name__)


def expire_if_stale(
    record: JobRecord,
    *,
    jobs: JobStore,
    queue: JobQueue | None,
    storage: ObjectStorage,
    ttl_seconds: float,
) -> JobRecord:
    """A job still queued after its time-to-live ends ``failed`` with ``queue-timeout``."""
    if record.status is not JobStatus.QUEUED:
        return record
    waited = (utcnow() - record.created_at).total_seconds()
    if waited <= ttl_seconds:
        return record
    error: JobError | StorageUnavailable = QueueTimeout(
        f"The job waited {waited:.0f} s in the queue, longer than its {ttl_seconds:.0f} s limit."
    )
    if record.storage_waits:  # it waited for storage, not for a worker: say so
        error = storage_deadline_error(ttl_seconds, record.storage_waits)
    if jobs.transition(
        record.id, from_statuses=[JobStatus.QUEUED], to=JobStatus.FAILED,
        finished_at=utcnow(),
        error=JobErrorInfo(type=error.type_name(), title=error.title, detail=error.detail),
        progress={"stage": "failed", "step": 0, "total": 0},
    ):  # fmt: skip
        if queue is not None:  # a worker has already taken it off the queue
            queue.cancel(record.rq_job_id or record.id)
        try:
            storage.delete(record.input_key)
        except SpaSemSRError:  # storage may still be down: the job's outcome matters more
            logger.warning("could not delete the input of expired job %s", record.id)
    return jobs.get(record.id)


_MIN_STORAGE_WAIT_SECONDS = 0.5


def storage_deadline_error(ttl_seconds: float, waits: int) -> StorageUnavailable:
    """The error of a job whose deadline passed while object storage stayed unavailable (its
    detail is shown to clients: no paths or internal error text)."""
    held = f"; it was held back {waits} time(s) waiting for it" if waits else ""
    return StorageUnavailable(
        f"Object storage was unavailable until the job's deadline ({ttl_seconds:.0f} s after "
        f"it was accepted){held}."
    )


def storage_wait_seconds(waits: int, *, first_seconds: float, max_seconds: float) -> float:
    """Wait before a job held back by a storage outage is queued again: doubling per
    hand-back, capped, and never zero (each try costs a worker its in-process retries)."""
    first = max(first_seconds, _MIN_STORAGE_WAIT_SECONDS)
    # min() on the exponent as well: 2**waits would overflow a float after ~1000 waits.
    return float(min(max_seconds, first * 2 ** min(waits, 32)))


class JobRecovery:
    def __init__(
        self,
        connection: Redis,
        *,
        prefix: str,
        jobs: JobStore,
        queue: JobQueue,
        registry: WorkerRegistry,
        max_attempts: int,
        backoff_seconds: float,
        job_timeout_seconds: int,
        keep_seconds: int,
        orphan_grace_seconds: float = 30.0,
    ) -> None:
        self._redis = connection
        self._running_key = f"{prefix}:running"
        self._lock_key = f"{prefix}:recovery-lock"
        self._delayed_key = f"{prefix}:delayed"
        self._jobs = jobs
        self._queue = queue
        self._registry = registry
        self._max_attempts = max_attempts
        self._backoff_seconds = backoff_seconds
        self._job_timeout_seconds = job_timeout_seconds
        self._keep_seconds = keep_seconds
        self._orphan_grace_seconds = orphan_grace_seconds

    def mark_running(self, job_id: str, worker: str) -> None:
        self._redis.hset(self._running_key, job_id, worker)

    def mark_done(self, job_id: str) -> None:
        self._redis.hdel(self._running_key, job_id)

    def running(self) -> dict[str, str]:
        raw = self._redis.hgetall(self._running_key)
        return {text(k): text(v) for k, v in raw.items()}

    def sweep(self) -> list[str]:
        """Hand the jobs of dead workers back to the queue; returns the ids it recovered."""
        if not self._redis.set(self._lock_key, "1", nx=True, px=10_000):
            return []
        try:
            alive = {worker.name for worker in self._registry.live()}
            recovered = []
            for job_id, worker in self.running().items():
                if worker not in alive:
                    self.requeue(job_id, worker, reason="its worker stopped answering")
                    recovered.append(job_id)
            self.release_due()
            return recovered + self.requeue_orphans()
        finally:
            self._redis.delete(self._lock_key)

    def requeue(
        self,
        job_id: str,
        worker: str,
        *,
        reason: str,
        count_attempt: bool = True,
        delay_seconds: float | None = None,
        storage_wait: bool = False,
    ) -> None:
        """Put a job that ``worker`` held back in line (or end it, see the module docstring).

        ``delay_seconds`` replaces the attempt backoff; ``storage_wait`` counts a hand-back
        because storage was unavailable on the record (``storage_waits``).
        """
        self.mark_done(job_id)
        record = self._jobs.get(job_id)
        if record.status is not JobStatus.PROCESSING or record.worker != worker:
            return
        if self._jobs.cancel_requested(job_id):
            self._end(job_id, worker, JobStatus.CANCELED, JobCanceled("Canceled while running."))
            return
        if count_attempt and record.attempts >= self._max_attempts:
            self._end(
                job_id, worker, JobStatus.FAILED,
                WorkerLost(
                    f"The job was running on a worker that died {record.attempts} times "
                    "(the last time: " + reason + "); it is not retried again."
                ),
            )  # fmt: skip
            return
        attempt = record.attempts if count_attempt else max(0, record.attempts - 1)
        rq_job_id = f"{job_id}-{uuid.uuid4().hex[:8]}"  # a fresh queue entry per attempt
        fields: dict[str, Any] = {
            "worker": None,
            "started_at": None,
            "attempts": attempt,
            "rq_job_id": rq_job_id,
            "progress": {"stage": "queued", "step": 0, "total": 0},
        }
        if storage_wait:
            fields["storage_waits"] = record.storage_waits + 1
            fields["progress"] = {"stage": "waiting-for-storage", "step": 0, "total": 0}
        if not self._jobs.transition(
            job_id, from_statuses=[JobStatus.PROCESSING], to=JobStatus.QUEUED, held_by=worker,
            **fields,
        ):  # fmt: skip
            return
        delay = self._backoff_seconds * (2 ** max(0, attempt - 1)) if count_attempt else 0.0
        if delay_seconds is not None:
            delay = delay_seconds
        if delay > 0:
            # Held in our own delay set rather than RQ's scheduler: any live worker's sweep
            # releases it on time, even when the worker that held RQ's scheduler lock died.
            self._redis.zadd(self._delayed_key, {job_id: time.time() + delay})
        else:
            self._enqueue(job_id)
        logger.warning("job %s requeued (%s; attempt %d; in %.1f s)", job_id, reason, attempt,
                       delay)  # fmt: skip

    def requeue_orphans(self) -> list[str]:
        """Queue again the queued jobs that no queue entry stands for any more (module doc)."""
        candidates = self._jobs.queued_since(time.time() - self._orphan_grace_seconds)
        if not candidates:
            return []
        # Any entry of a job runs it (a worker starts whatever queued job its entry names), so
        # a job is in line when an entry id is the job id or the job id plus an attempt suffix:
        # only the jobs no entry names are read from Redis.
        represented = {entry.partition("-")[0] for entry in self._queue.entries_in_line()}
        delayed = {text(raw) for raw in self._redis.zrange(self._delayed_key, 0, -1)}
        orphans = []
        for job_id in candidates:
            if job_id in represented or job_id in delayed:
                continue
            try:
                record = self._jobs.get(job_id)
            except JobNotFound:  # expired: nothing left to do for it
                self._jobs.drop_from_queued_index(job_id)
                continue
            if record.status is not JobStatus.QUEUED:
                self._jobs.drop_from_queued_index(job_id)
                continue
            rq_job_id = f"{job_id}-{uuid.uuid4().hex[:8]}"
            if self._jobs.transition(
                job_id, from_statuses=[JobStatus.QUEUED], to=JobStatus.QUEUED, rq_job_id=rq_job_id
            ):
                self._enqueue(job_id)
                orphans.append(job_id)
                logger.warning("job %s had no queue entry (taken by a worker that stopped "
                               "before starting it); queued again", job_id)  # fmt: skip
        return orphans

    def release_due(self) -> list[str]:
        """Queue the handed-back jobs whose backoff is over (called under the sweep lock)."""
        released = []
        for raw in self._redis.zrangebyscore(self._delayed_key, "-inf", time.time()):
            job_id = text(raw)
            self._enqueue(job_id)  # first: a failure here leaves it for the next sweep
            self._redis.zrem(self._delayed_key, job_id)
            released.append(job_id)
        return released

    def _enqueue(self, job_id: str) -> None:
        record = self._jobs.get(job_id)
        if record.status is not JobStatus.QUEUED or record.rq_job_id is None:
            return
        self._queue.enqueue(
            payload_for(record),
            record.priority,
            timeout_seconds=self._job_timeout_seconds,
            keep_seconds=self._keep_seconds,
            rq_job_id=record.rq_job_id,
        )

    def _end(self, job_id: str, worker: str, status: JobStatus, error: JobError) -> None:
        self._jobs.transition(
            job_id, from_statuses=[JobStatus.PROCESSING], to=status, held_by=worker,
            finished_at=utcnow(),
            error=JobErrorInfo(type=error.type_name(), title=error.title, detail=error.detail),
            progress={"stage": status.value, "step": 0, "total": 0},
        )  # fmt: skip
