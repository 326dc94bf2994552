"""At least once between dequeue and start: a job taken off the queue by a worker that stopped
before starting it is found by the recovery sweep and runs, once.

This is the state SIGTERM to an idle worker leaves when a job arrives in the same instant: RQ
has popped the entry, its stop handler raises, and the record still says ``queued``. The test
makes that state exactly (a real Redis, the real queue, record store, sweep and job runner).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from redis import Redis

from core.jobs import (
    ImageFormat,
    ImageInfo,
    JobParameters,
    JobPayload,
    JobRecord,
    JobStatus,
    Priority,
    input_key_for,
    new_job_id,
    output_key_for,
    payload_for,
    utcnow,
)
from core.models import ModelName
from core.recovery import JobRecovery
from core.settings import Settings
from tests.conftest import png_bytes
from tests.worker.runtimes import in_process_runtime
from worker.runtime import WorkerRuntime
from worker.tasks import JobRunner

LANCZOS_DEFAULT = (ModelName.LANCZOS, Priority.DEFAULT)


@pytest.fixture
def runtime(settings: Settings, tmp_path: Path) -> WorkerRuntime:
    return in_process_runtime(
        settings, tmp_path / "storage", name="survivor", retry_backoff_seconds=0,
        orphan_grace_seconds=0,
    )  # fmt: skip


def _accept(runtime: WorkerRuntime) -> JobRecord:
    """What the API does for an accepted upload: input stored, record created, entry queued."""
    job_id = new_job_id()
    parameters = JobParameters(model=ModelName.LANCZOS, scale=2)
    record = JobRecord(
        id=job_id,
        status=JobStatus.QUEUED,
        priority=Priority.DEFAULT,
        parameters=parameters,
        input=ImageInfo(width=24, height=16, format=ImageFormat.PNG, bytes=1),
        input_key=input_key_for(job_id),
        output_key=output_key_for(job_id, ImageFormat.PNG),
        created_at=utcnow(),
    )
    runtime.storage.put(record.input_key, png_bytes(), content_type="image/png")
    runtime.jobs.create(record)
    assert runtime.queue is not None
    runtime.queue.enqueue(payload_for(record), record.priority, timeout_seconds=60,
                          keep_seconds=600)  # fmt: skip
    return record


def _pop_like_a_stopping_worker(runtime: WorkerRuntime) -> str:
    """BLPOP as RQ does, then nothing: the worker's stop handler raised before the job started."""
    assert runtime.queue is not None
    key = runtime.queue.queue(*LANCZOS_DEFAULT).key
    popped = Redis.from_url(runtime.settings.redis.url or "").lpop(key)
    assert popped is not None
    return popped.decode() if isinstance(popped, bytes) else str(popped)


def _take_and_run(runtime: WorkerRuntime) -> list[str]:
    """A live worker drains the queue; returns the statuses its runs report."""
    assert runtime.queue is not None
    connection = Redis.from_url(runtime.settings.redis.url or "")
    outcomes = []
    while entry := connection.lpop(runtime.queue.queue(*LANCZOS_DEFAULT).key):
        job = runtime.queue.fetch(entry.decode() if isinstance(entry, bytes) else str(entry))
        assert job is not None
        outcomes.append(JobRunner(runtime, JobPayload.model_validate(job.args[0])).run()["status"])
    return outcomes


def test_a_job_popped_by_a_worker_that_stopped_is_queued_again_and_runs_once(
    runtime: WorkerRuntime,
) -> None:
    assert runtime.recovery is not None
    lost = _accept(runtime)
    _pop_like_a_stopping_worker(runtime)
    assert runtime.queue is not None
    assert runtime.queue.total_depth() == 0  # the state of the issue: queued, in no queue

    assert runtime.recovery.sweep() == [lost.id]
    record = runtime.jobs.get(lost.id)
    assert record.status is JobStatus.QUEUED and record.attempts == 0
    assert record.rq_job_id and record.rq_job_id != lost.id  # a fresh entry
    assert runtime.queue.depths()[LANCZOS_DEFAULT] == 1

    assert _take_and_run(runtime) == ["succeeded"]
    assert runtime.jobs.get(lost.id).status is JobStatus.SUCCEEDED
    assert runtime.recovery.sweep() == []  # nothing queued is left to recover


def test_the_race_repeated_loses_nothing_and_runs_nothing_twice(runtime: WorkerRuntime) -> None:
    """50 jobs, each taken by a worker that stops at once, with jobs still waiting beside them."""
    assert runtime.recovery is not None
    lost = []
    for _ in range(50):
        lost.append(_accept(runtime).id)
        _pop_like_a_stopping_worker(runtime)
    waiting = [_accept(runtime).id for _ in range(5)]  # in line: must not get a second entry
    assert sorted(runtime.recovery.sweep()) == sorted(lost)
    assert runtime.queue is not None
    assert runtime.queue.depths()[LANCZOS_DEFAULT] == 55
    assert _take_and_run(runtime) == ["succeeded"] * 55
    for job_id in lost + waiting:
        record = runtime.jobs.get(job_id)
        assert record.status is JobStatus.SUCCEEDED, record
        assert record.attempts == 1


def test_a_slow_worker_that_starts_the_old_entry_after_all_does_not_run_it_twice(
    runtime: WorkerRuntime,
) -> None:
    assert runtime.recovery is not None and runtime.queue is not None
    record = _accept(runtime)
    old_entry = _pop_like_a_stopping_worker(runtime)
    assert runtime.recovery.sweep() == [record.id]
    # The "stopped" worker was only slow: it starts its old entry now.
    job = runtime.queue.fetch(old_entry)
    assert job is not None
    assert JobRunner(runtime, JobPayload.model_validate(job.args[0])).run() == {
        "status": "succeeded"
    }
    assert _take_and_run(runtime) == ["skipped"]  # the fresh entry finds it done
    assert runtime.jobs.get(record.id).attempts == 1


def test_jobs_in_line_delayed_or_finished_are_left_alone(runtime: WorkerRuntime) -> None:
    assert runtime.recovery is not None and runtime.queue is not None
    waiting = _accept(runtime)
    canceled = _accept(runtime)
    assert runtime.jobs.transition(canceled.id, from_statuses=[JobStatus.QUEUED],
                                   to=JobStatus.CANCELED)  # fmt: skip
    runtime.queue.cancel(canceled.id)
    assert runtime.recovery.sweep() == []
    assert runtime.queue.depths()[LANCZOS_DEFAULT] == 1
    assert runtime.jobs.get(waiting.id).rq_job_id is None  # untouched
    # A canceled job leaves the queued index at once; a waiting one stays in it.
    assert runtime.jobs.queued_since(float("inf")) == [waiting.id]


def test_a_job_within_the_grace_period_is_not_taken_for_lost(
    settings: Settings, runtime: WorkerRuntime
) -> None:
    """Between a worker's pop and its start there are milliseconds: the grace covers them."""
    assert runtime.queue is not None
    patient = JobRecovery(
        Redis.from_url(settings.redis.url or ""), prefix="spasemsr", jobs=runtime.jobs,
        queue=runtime.queue, registry=runtime.registry, max_attempts=3, backoff_seconds=0,
        job_timeout_seconds=60, keep_seconds=600, orphan_grace_seconds=60,
    )  # fmt: skip
    _accept(runtime)
    _pop_like_a_stopping_worker(runtime)
    assert patient.sweep() == []
