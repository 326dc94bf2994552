"""Job records and the RQ queue wrapper against a real redis-server."""

from __future__ import annotations

import json
import zlib

import pytest
from redis import Redis

from core.embedded_redis import EmbeddedRedis
from core.errors import JobNotFound
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
    utcnow,
)
from core.queue import JobQueue
from core.records import JobStore


@pytest.fixture
def connection(redis_server: EmbeddedRedis) -> Redis:
    return Redis.from_url(redis_server.url)


def _record(priority: Priority = Priority.DEFAULT) -> JobRecord:
    job_id = new_job_id()
    return JobRecord(
        id=job_id,
        status=JobStatus.QUEUED,
        priority=priority,
        parameters=JobParameters(),
        input=ImageInfo(width=4, height=4, format=ImageFormat.PNG, bytes=10),
        input_key=input_key_for(job_id),
        output_key=output_key_for(job_id, ImageFormat.PNG),
        created_at=utcnow(),
    )


def _payload(record: JobRecord) -> JobPayload:
    return JobPayload(
        job_id=record.id,
        input_key=record.input_key,
        output_key=record.output_key,
        input=record.input,
        parameters=record.parameters,
    )


def test_record_roundtrip_and_field_updates(connection: Redis) -> None:
    store = JobStore(connection, prefix="t", ttl_seconds=100)
    record = _record()
    store.create(record)
    assert store.get(record.id) == record
    store.update(record.id, progress={"stage": "denoise", "step": 3, "total": 20})
    assert store.get(record.id).progress.step == 3
    assert 0 < connection.ttl(f"t:job:{record.id}") <= 100


def test_transitions_are_exclusive(connection: Redis) -> None:
    store = JobStore(connection, prefix="t", ttl_seconds=100)
    record = _record()
    store.create(record)
    assert store.transition(record.id, from_statuses=[JobStatus.QUEUED], to=JobStatus.CANCELED)
    # The worker arrives second: it must not start a canceled job.
    assert not store.transition(
        record.id, from_statuses=[JobStatus.QUEUED], to=JobStatus.PROCESSING
    )
    assert store.get(record.id).status is JobStatus.CANCELED
    with pytest.raises(JobNotFound):
        store.transition("missing", from_statuses=[JobStatus.QUEUED], to=JobStatus.CANCELED)


def test_cancel_flag(connection: Redis) -> None:
    store = JobStore(connection, prefix="t", ttl_seconds=100)
    record = _record()
    store.create(record)
    assert not store.cancel_requested(record.id)
    store.request_cancel(record.id)
    assert store.cancel_requested(record.id)
    assert store.get(record.id).id == record.id  # the flag is not part of the record


def test_queue_carries_json_only_and_orders_by_priority(connection: Redis) -> None:
    queue = JobQueue(connection, prefix="t")
    low, default, high = _record(Priority.LOW), _record(), _record(Priority.HIGH)
    for record in (low, default, high):
        queue.enqueue(_payload(record), record.priority, timeout_seconds=60, keep_seconds=60)
    assert queue.depth() == {Priority.HIGH: 1, Priority.DEFAULT: 1, Priority.LOW: 1}
    assert queue.position(high.id, Priority.HIGH) == 0
    assert queue.position(default.id, Priority.DEFAULT) == 1
    assert queue.position(low.id, Priority.LOW) == 2
    raw = connection.hget(f"rq:job:{default.id}", "data")
    assert raw is not None
    data = json.loads(zlib.decompress(raw))  # RQ compresses; underneath it is JSON, not pickle
    assert data[0] == "worker.tasks.run_job"
    assert data[2][0]["job_id"] == default.id
    queue.cancel(default.id)
    assert queue.depth()[Priority.DEFAULT] == 0
    assert queue.position(low.id, Priority.LOW) == 1
    queue.cancel("never-existed")  # no error


def test_job_parameters_have_bounds() -> None:
    from pydantic import ValidationError

    bad_values: list[dict[str, object]] = [
        {"scale": 3},
        {"steps": 0},
        {"steps": 101},
        {"guidance_scale": -1},
        {"tile_size": 300},
        {"seed": -1},
        {"color_fix": "purple"},
        {"tags": ["x" * 65]},
    ]
    for bad in bad_values:
        with pytest.raises(ValidationError):
            JobParameters.model_validate(bad)
    assert JobParameters.model_validate({"tags": [" sky ", "", "sea"]}).tags == ("sky", "sea")
