"""The submission engine against a real redis-server: what one upload writes, what a failure
leaves behind (nothing), and how many round trips an upload costs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pytest
from redis import Redis
from redis.client import Pipeline
from redis.connection import UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import utcformat

from app.uploads import check_image
from core.errors import (
    IdempotencyKeyMismatch,
    ModelNotServed,
    Overloaded,
    StorageUnavailable,
    UnsupportedImage,
)
from core.jobs import JobParameters, JobStatus, Priority
from core.limits import IdempotencyKeys
from core.models import ModelName
from core.queue import TASK, JobQueue, Outcome
from core.records import JobStore
from core.settings import Settings
from core.storage import LocalStorage, ObjectStorage
from core.submission import Submission, SubmissionService
from core.workers import WorkerInfo, WorkerRegistry, WorkerState
from tests.conftest import png_bytes

PREFIX = "spasemsr"
LANCZOS = ModelName.LANCZOS


class CountingConnection(UnixDomainSocketConnection):
    """Counts what is sent: one send is one round trip (a pipeline sends all at once)."""

    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


class BrokenStorage:
    """Local storage whose writes fail, like a bucket that went away."""

    def __init__(self, inner: ObjectStorage) -> None:
        self.inner = inner

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        raise StorageUnavailable("object storage refused the write")

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def presigned_url(self, key: str) -> str | None:
        return None

    def check(self) -> None:
        self.inner.check()


def _service(
    settings: Settings, connection: Redis, storage: ObjectStorage | None = None
) -> SubmissionService:
    return SubmissionService(
        settings=settings,
        redis=connection,
        storage=storage or LocalStorage(settings.storage_root()),
        jobs=JobStore(connection, prefix=PREFIX, ttl_seconds=settings.worker.record_ttl_seconds),
        queue=JobQueue(connection, prefix=PREFIX),
        workers=WorkerRegistry(connection, prefix=PREFIX),
        idempotency=IdempotencyKeys(connection, prefix=PREFIX, ttl_seconds=3600),
        check_image=check_image,
    )


def _submission(
    data: bytes | None = None,
    *,
    priority: Priority = Priority.DEFAULT,
    key: str | None = None,
    scale: Literal[2, 4] = 2,
    model: ModelName | None = None,
) -> Submission:
    return Submission(
        data=png_bytes() if data is None else data,
        model=model,
        parameters_for=lambda chosen: JobParameters(model=chosen, scale=scale),
        priority=priority,
        webhook_url=None,
        client="anonymous",
        owner=None,
        idempotency_key=key,
    )


@pytest.fixture
def connection(settings: Settings) -> Iterator[Redis]:
    url = settings.redis.url or ""
    assert url.startswith("unix://")  # the counting connection is a unix-socket one
    redis = Redis.from_url(url, connection_class=CountingConnection)
    yield redis
    redis.close()


def _queue_key(priority: Priority) -> str:
    return f"rq:queue:{PREFIX}-{LANCZOS.value}-{priority.value}"


def _nothing_left_behind(connection: Redis, settings: Settings) -> None:
    assert list(connection.scan_iter(f"{PREFIX}:job:*")) == []
    assert list(connection.scan_iter("rq:job:*")) == []
    assert list(connection.scan_iter(f"{PREFIX}:idempotency:*")) == []
    assert connection.zcard(f"{PREFIX}:queued") == 0
    assert connection.zcard(f"{PREFIX}:admission:{LANCZOS.value}") == 0
    assert all(connection.llen(_queue_key(p)) == 0 for p in Priority)
    root = settings.storage_root()
    assert not root.exists() or not any(p.is_file() for p in root.rglob("*"))


def test_an_accepted_job_has_its_record_queue_entry_and_index_entry(
    settings: Settings, connection: Redis
) -> None:
    accepted = _service(settings, connection).submit(_submission())
    record = accepted.record
    assert not accepted.replayed and accepted.position == 0
    stored = JobStore(connection, prefix=PREFIX, ttl_seconds=60).get(record.id)
    assert stored == record and stored.status is JobStatus.QUEUED and stored.model is LANCZOS
    assert connection.lrange(_queue_key(Priority.DEFAULT), 0, -1) == [record.id.encode()]
    assert connection.zscore(f"{PREFIX}:queued", record.id) == pytest.approx(
        record.created_at.timestamp()
    )
    assert connection.zcard(f"{PREFIX}:admission:{LANCZOS.value}") == 0  # the place became it
    assert (Path(settings.storage_root()) / record.input_key).read_bytes() == png_bytes()
    assert 0 < connection.ttl(f"{PREFIX}:job:{record.id}") <= settings.worker.record_ttl_seconds


def test_the_queue_entry_is_the_rq_job_that_enqueue_job_writes(
    settings: Settings, connection: Redis
) -> None:
    """What the commit writes by hand in its transaction is what RQ writes by itself, and an
    RQ worker's dequeue hands it out."""
    record = _service(settings, connection).submit(_submission()).record
    rq_queue = Queue(f"{PREFIX}-{LANCZOS.value}-default", connection=connection,
                     serializer=JSONSerializer)  # fmt: skip
    reference = rq_queue.enqueue_job(
        rq_queue.create_job(
            TASK,
            args=({"x": 1},),
            job_id="reference",
            timeout=60,
            result_ttl=60,
            failure_ttl=60,
            description="reference",
        )
    )
    ours, theirs = connection.hgetall(Job.key_for(record.id)), connection.hgetall(reference.key)
    assert sorted(ours) == sorted(theirs)
    assert ours[b"status"] == theirs[b"status"] == b"queued"
    assert ours[b"origin"] == theirs[b"origin"]
    assert connection.ttl(Job.key_for(record.id)) == connection.ttl(reference.key)
    assert connection.sismember("rq:queues", rq_queue.key)
    found = Queue.dequeue_any([rq_queue], timeout=None, connection=connection,
                              serializer=JSONSerializer)  # fmt: skip
    assert found is not None
    job, _ = found
    assert job.id == record.id and job.func_name == TASK and job.origin == rq_queue.name
    assert job.args[0]["job_id"] == record.id and job.args[0]["input_key"] == record.input_key
    assert job.timeout == settings.worker.job_timeout_seconds
    assert job.result_ttl == job.failure_ttl == settings.worker.record_ttl_seconds


def test_the_place_in_line_counts_higher_priorities_first(
    settings: Settings, connection: Redis
) -> None:
    service = _service(settings, connection)
    positions = [
        service.submit(_submission(priority=priority)).position
        for priority in (Priority.DEFAULT, Priority.DEFAULT, Priority.HIGH, Priority.LOW)
    ]
    assert positions == [0, 1, 0, 3]


def test_a_failed_storage_write_leaves_nothing_behind(
    settings: Settings, connection: Redis
) -> None:
    storage = BrokenStorage(LocalStorage(settings.storage_root()))
    with pytest.raises(StorageUnavailable):
        _service(settings, connection, storage).submit(_submission(key="k"))
    _nothing_left_behind(connection, settings)
    # The key was given back: the same request succeeds once storage works.
    assert not _service(settings, connection).submit(_submission(key="k")).replayed


def test_a_lost_commit_answer_leaves_nothing_behind(
    settings: Settings, connection: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transaction ran, but its answer never came back: the submission fails (503) and
    takes back all it wrote, record, queue entry and input alike."""
    execute = Pipeline.execute
    lost: list[list[Any]] = []

    def execute_then_lose_the_answer(self: Pipeline, raise_on_error: bool = True) -> Any:
        answers = execute(self, raise_on_error)
        if not lost:
            lost.append(answers)
            raise RedisConnectionError("connection lost while reading the answer")
        return answers

    monkeypatch.setattr(Pipeline, "execute", execute_then_lose_the_answer)
    with pytest.raises(RedisConnectionError):
        _service(settings, connection).submit(_submission(key="k"))
    assert lost  # the commit had written everything
    _nothing_left_behind(connection, settings)


def test_refusals_before_admission_write_nothing(settings: Settings, connection: Redis) -> None:
    service = _service(settings, connection)
    with pytest.raises(UnsupportedImage):
        service.submit(_submission(b"not an image", key="k"))
    with pytest.raises(ModelNotServed):
        service.submit(_submission(model=ModelName.SPASEMSR))  # no worker serves it
    _nothing_left_behind(connection, settings)


def test_a_full_queue_refuses_and_holds_no_place(settings: Settings, connection: Redis) -> None:
    settings.api.max_queue_depth = 2
    service = _service(settings, connection)
    for _ in range(2):
        service.submit(_submission())
    with pytest.raises(Overloaded, match="2 lanczos jobs are waiting"):
        service.submit(_submission(priority=Priority.HIGH))  # every priority counts
    assert connection.zcard(f"{PREFIX}:admission:{LANCZOS.value}") == 0
    assert sum(connection.llen(_queue_key(p)) for p in Priority) == 2


def test_a_repeated_key_replays_without_a_new_entry(settings: Settings, connection: Redis) -> None:
    service = _service(settings, connection)
    first = service.submit(_submission(key="order-1"))
    again = service.submit(_submission(key="order-1"))
    assert again.replayed and again.record == first.record and again.position == 0
    assert connection.llen(_queue_key(Priority.DEFAULT)) == 1
    assert connection.zcard(f"{PREFIX}:admission:{LANCZOS.value}") == 0  # no place taken
    with pytest.raises(IdempotencyKeyMismatch):
        service.submit(_submission(key="order-1", scale=4))


def _stamp(seconds: float) -> str:
    return utcformat(datetime.fromtimestamp(seconds, UTC))


@pytest.mark.parametrize(
    "stamp",
    [
        "2000-02-29T23:59:59.500000Z",
        "1999-12-31T00:00:00Z",
        "2024-03-01T00:00:00.000001Z",
        "2100-01-01T12:34:56.789000Z",
        "1970-01-01T00:00:00.000000Z",
    ],
)
def test_the_age_check_reads_rq_stamps_as_python_does(
    settings: Settings, connection: Redis, stamp: str
) -> None:
    """The admission script parses RQ's ``enqueued_at`` itself (Lua has no dates)."""
    record = _service(settings, connection).submit(_submission()).record
    connection.hset(Job.key_for(record.id), "enqueued_at", stamp)
    expected = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    queue = JobQueue(connection, prefix=PREFIX)
    admission = queue.admit(LANCZOS, "probe", cap=100, oldest_allowed=expected + 0.001)
    assert admission.outcome is Outcome.TOO_OLD
    assert admission.oldest_enqueued == pytest.approx(expected, abs=1e-6)
    admitted = queue.admit(LANCZOS, "probe", cap=100, oldest_allowed=expected - 0.001)
    assert admitted.outcome is Outcome.ADMITTED and admitted.depth == 1


def test_an_old_queue_refuses_by_age(settings: Settings, connection: Redis) -> None:
    settings.api.max_queue_age_seconds = 60
    service = _service(settings, connection)
    record = service.submit(_submission()).record
    connection.hset(Job.key_for(record.id), "enqueued_at", _stamp(time.time() - 120))
    with pytest.raises(Overloaded, match=r"oldest queued lanczos job has waited 12\d s"):
        service.submit(_submission())
    assert connection.zcard(f"{PREFIX}:admission:{LANCZOS.value}") == 0


def _announce_worker(connection: Redis) -> None:
    info = WorkerInfo(name="w1", state=WorkerState.IDLE, serving=(LANCZOS,), pid=1,
                      hostname="h", started_at=datetime.now(UTC))  # fmt: skip
    WorkerRegistry(connection, prefix=PREFIX).announce(info, ttl_seconds=600)


@pytest.mark.parametrize("key", [None, "order-7"], ids=["plain", "idempotency-key"])
def test_one_submission_costs_three_round_trips(
    settings: Settings, connection: Redis, key: str | None
) -> None:
    """Live workers, admission (age, depth, place, key), commit: the thin path stays thin.
    (Before it was 11-13 round trips.) A first call also asks the server's version, for RQ."""
    _announce_worker(connection)
    service = _service(settings, connection)
    service.submit(_submission())  # steady state: scripts loaded, RQ knows the version
    service.submit(_submission(priority=Priority.HIGH))  # a queue head to check the age of
    CountingConnection.sent = 0
    accepted = service.submit(_submission(priority=Priority.LOW, key=key))
    assert CountingConnection.sent <= 3
    assert accepted.position == 2


def test_a_worker_registry_read_is_one_round_trip(connection: Redis) -> None:
    _announce_worker(connection)
    registry = WorkerRegistry(connection, prefix=PREFIX)
    registry.live()
    CountingConnection.sent = 0
    assert [w.name for w in registry.live()] == ["w1"]
    assert CountingConnection.sent == 1
    connection.zadd(f"{PREFIX}:workers", {"gone": time.time() - 1})
    assert [w.name for w in registry.live()] == ["w1"]
    assert connection.zscore(f"{PREFIX}:workers", "gone") is None  # pruned as it was seen
    assert json.loads(connection.get(f"{PREFIX}:worker:w1") or "{}")["name"] == "w1"
