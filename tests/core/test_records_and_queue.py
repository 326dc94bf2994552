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
from core.models import ModelName
from core.queue import JobQueue
from core.records import JobStore


@pytest.fixture
def connection(redis_server: EmbeddedRedis) -> Redis:
    return Redis.from_url(redis_server.url)


def _record(
    priority: Priority = Priority.DEFAULT, model: ModelName = ModelName.LANCZOS
) -> JobRecord:
    job_id = new_job_id()
    return JobRecord(
        id=job_id,
        status=JobStatus.QUEUED,
        priority=priority,
        parameters=JobParameters(model=model),
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
    lanczos = ModelName.LANCZOS
    depths = queue.depths()
    assert {key: n for key, n in depths.items() if n} == {
        (lanczos, Priority.HIGH): 1,
        (lanczos, Priority.DEFAULT): 1,
        (lanczos, Priority.LOW): 1,
    }
    assert len(depths) == len(ModelName) * len(Priority)
    assert queue.position(high.id, lanczos, Priority.HIGH) == 0
    assert queue.position(default.id, lanczos, Priority.DEFAULT) == 1
    assert queue.position(low.id, lanczos, Priority.LOW) == 2
    raw = connection.hget(f"rq:job:{default.id}", "data")
    assert isinstance(raw, bytes)
    data = json.loads(zlib.decompress(raw))  # RQ compresses; underneath it is JSON, not pickle
    assert data[0] == "worker.tasks.run_job"
    assert data[2][0]["job_id"] == default.id
    queue.cancel(default.id)
    assert queue.depths()[(lanczos, Priority.DEFAULT)] == 0
    assert queue.position(low.id, lanczos, Priority.LOW) == 1
    queue.cancel("never-existed")  # no error


def test_each_model_has_its_own_queues(connection: Redis) -> None:
    queue = JobQueue(connection, prefix="t")
    other = _record(Priority.HIGH, ModelName.REALESRGAN_X4PLUS)
    mine = _record(Priority.DEFAULT, ModelName.LANCZOS)
    for record in (other, mine):
        queue.enqueue(_payload(record), record.priority, timeout_seconds=60, keep_seconds=60)
    # Another model's high-priority job is not ahead of this one: they go to other workers.
    assert queue.position(mine.id, ModelName.LANCZOS, Priority.DEFAULT) == 0
    assert queue.queue(ModelName.REALESRGAN_X4PLUS, Priority.HIGH).name == (
        "t-realesrgan-x4plus-high"
    )
    assert queue.total_depth() == 2
    oldest = queue.oldest_enqueued()
    assert oldest[(ModelName.LANCZOS, Priority.DEFAULT)] is not None
    assert oldest[(ModelName.LANCZOS, Priority.HIGH)] is None
    age = utcnow() - oldest[(ModelName.REALESRGAN_X4PLUS, Priority.HIGH)]  # type: ignore[operator]
    assert age.total_seconds() < 60
    with pytest.raises(ValueError, match="names no model"):
        queue.enqueue(
            _payload(_record()).model_copy(update={"parameters": JobParameters()}),
            Priority.DEFAULT,
            timeout_seconds=60,
            keep_seconds=60,
        )


def test_a_worker_serves_every_held_model_by_priority_first(connection: Redis) -> None:
    queue = JobQueue(connection, prefix="t")
    held = (ModelName.SPASEMSR, ModelName.LANCZOS)
    names = [q.name for q in queue.queues_for(held, ("high", "low"))]
    assert names == [
        "t-spasemsr-high",
        "t-lanczos-high",
        "t-spasemsr-low",
        "t-lanczos-low",
        "t-webhooks",
    ]


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
