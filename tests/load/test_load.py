"""Bounded load test: many small jobs, the Lanczos upscaler, two workers, real processes.

Every accepted job must succeed, none may be lost (each ends with exactly one result object
and one finished queue entry) and none may run twice (``attempts == 1``, one worker each).

The size comes from ``SPASEMSR_LOAD_JOBS`` (default 300, for ``make test``); the reliability
target is 2,000 (``SPASEMSR_LOAD_JOBS=2000``). Throughput and end-to-end latency are printed
(``-s``), attached to the JUnit report as properties and written as JSON to
``var/test-artifacts/load/``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis
from rq import Queue
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from core.embedded_redis import EmbeddedRedis
from tests.conftest import ROOT, ServiceProcesses, png_bytes, start_service

JOBS = int(os.environ.get("SPASEMSR_LOAD_JOBS", "300"))
WORKERS = 2
SUBMIT_THREADS = int(os.environ.get("SPASEMSR_LOAD_THREADS", "8"))
PRIORITIES = ("high", "default", "low")
PREFIX = "spasemsr"
# Budgets that grow with the size: a shared 2-core machine runs well over 20 jobs/s.
SUBMIT_TIMEOUT_S = 60 + JOBS * 0.1
DRAIN_TIMEOUT_S = 60 + JOBS * 0.1
ARTIFACTS = ROOT / "var" / "test-artifacts" / "load"


@pytest.fixture
def aof_redis() -> Iterator[EmbeddedRedis]:
    """A redis-server with AOF on, as in production (short path: unix socket length limit)."""
    directory = Path(tempfile.mkdtemp(prefix="ssr-load-"))
    server = EmbeddedRedis(directory, appendonly=True).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def load_service(aof_redis: EmbeddedRedis, tmp_path: Path) -> Iterator[ServiceProcesses]:
    service = start_service(
        aof_redis.url,
        tmp_path,
        workers=WORKERS,
        SPASEMSR_WORKER__MODELS='["lanczos"]',
        SPASEMSR_MODEL__DEFAULT="lanczos",
        SPASEMSR_API__RATE_LIMIT_PER_MINUTE="0",
        SPASEMSR_API__MAX_QUEUE_DEPTH="100000",
    )
    try:
        yield service
    finally:
        service.stop()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100)."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def eventually(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll ``check`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not true after {timeout:.0f} s")
        time.sleep(0.1)


def submit_all(url: str, image: bytes) -> list[tuple[str, str]]:
    """POST ``JOBS`` jobs from a thread pool; returns (job id, priority) per accepted job."""
    local = threading.local()
    clients: list[httpx.Client] = []
    lock = threading.Lock()

    def client() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=30)
            with lock:
                clients.append(local.client)
        c: httpx.Client = local.client
        return c

    def submit(index: int) -> tuple[str, str]:
        priority = PRIORITIES[index % len(PRIORITIES)]
        response = client().post(
            "/v1/jobs",
            files={"image": (f"load-{index}.png", image, "image/png")},
            data={"scale": "2", "priority": priority, "output_format": "png"},
        )
        assert response.status_code == 202, (index, response.status_code, response.text)
        body = response.json()
        assert body["status"] in {"queued", "processing", "succeeded"}, body
        assert response.headers["Location"].endswith(f"/v1/jobs/{body['id']}")  # absolute
        return str(body["id"]), priority

    try:
        with ThreadPoolExecutor(SUBMIT_THREADS, thread_name_prefix="load-submit") as pool:
            futures = [pool.submit(submit, i) for i in range(JOBS)]
            return [f.result(timeout=SUBMIT_TIMEOUT_S) for f in futures]
    finally:
        for c in clients:
            c.close()


def read_records(redis: Redis, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The job records straight from Redis: one hash per job, one JSON value per field."""
    with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hgetall(f"{PREFIX}:job:{job_id}")
        raw: list[dict[bytes, bytes]] = pipe.execute()
    return {
        job_id: {k.decode(): json.loads(v) for k, v in fields.items()}
        for job_id, fields in zip(job_ids, raw, strict=True)
    }


def wait_all_terminal(redis: Redis, job_ids: list[str], timeout: float) -> None:
    pending = list(job_ids)
    deadline = time.monotonic() + timeout
    while pending:
        with redis.pipeline(transaction=False) as pipe:
            for job_id in pending:
                pipe.hget(f"{PREFIX}:job:{job_id}", "status")
            statuses: list[bytes | None] = pipe.execute()
        pending = [
            job_id
            for job_id, status in zip(pending, statuses, strict=True)
            if status is None or json.loads(status) in {"queued", "processing"}
        ]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(pending)} of {len(job_ids)} jobs not finished after {timeout:.0f} s, "
                f"e.g. {pending[:5]}"
            )
        time.sleep(0.2)


def seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


@pytest.mark.timeout(int(120 + SUBMIT_TIMEOUT_S + DRAIN_TIMEOUT_S + 60))
def test_load_all_jobs_complete_exactly_once(
    load_service: ServiceProcesses,
    aof_redis: EmbeddedRedis,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    redis = Redis.from_url(aof_redis.url)
    image = png_bytes(16, 16)

    began = time.monotonic()
    accepted = submit_all(load_service.url, image)
    submit_seconds = time.monotonic() - began
    job_ids = [job_id for job_id, _ in accepted]
    priority_of = dict(accepted)
    assert len(job_ids) == JOBS
    assert len(set(job_ids)) == JOBS, "the API handed out a job id twice"

    wait_all_terminal(redis, job_ids, DRAIN_TIMEOUT_S)
    drained_seconds = time.monotonic() - began

    # The public view: every accepted job succeeded.
    with httpx.Client(base_url=load_service.url, timeout=30) as client:
        statuses = Counter(client.get(f"/v1/jobs/{job_id}").json()["status"] for job_id in job_ids)
    assert statuses == {"succeeded": JOBS}, statuses

    # The records: each job started exactly once, by one of the two workers, as submitted.
    records = read_records(redis, job_ids)
    for job_id, record in records.items():
        assert record["status"] == "succeeded", (job_id, record)
        assert record["attempts"] == 1, (job_id, record["attempts"])
        assert record["worker"], (job_id, record)
        assert record["priority"] == priority_of[job_id]
        assert record["error"] is None, (job_id, record["error"])
        output = record["output"]
        assert (output["width"], output["height"], output["format"]) == (32, 32, "png"), output
        assert output["bytes"] > 0, output
    per_worker = Counter(str(record["worker"]) for record in records.values())
    assert len(per_worker) == WORKERS, f"expected both workers to take jobs: {per_worker}"

    # Storage: exactly one result object per job and nothing else; every input cleaned up.
    storage = tmp_path / "var" / "storage"
    results = sorted(p.name for p in (storage / "results").iterdir())
    assert results == sorted(f"{job_id}.png" for job_id in job_ids)
    eventually(
        lambda: not any((storage / "inputs").iterdir()),
        timeout=30,
        what="inputs of finished jobs are deleted",
    )

    # The queue: nothing left waiting or running, nothing failed, one finished entry per job.
    queues = [
        Queue(f"{PREFIX}-lanczos-{p}", connection=redis, serializer=JSONSerializer)
        for p in PRIORITIES
    ]

    def rq_settled() -> bool:
        return (
            all(StartedJobRegistry(queue=q).count == 0 and redis.llen(q.key) == 0 for q in queues)
            and sum(FinishedJobRegistry(queue=q).count for q in queues) >= JOBS
        )

    eventually(rq_settled, timeout=30, what="RQ queues empty and every job finished in RQ")
    for queue in queues:
        assert queue.key == f"rq:queue:{PREFIX}-lanczos-{queue.name.rsplit('-', 1)[1]}"
        assert redis.llen(queue.key) == 0, queue.name
        assert FailedJobRegistry(queue=queue).count == 0, queue.name
    finished = Counter(
        job_id for q in queues for job_id in FinishedJobRegistry(queue=q).get_job_ids()
    )
    assert set(finished) == set(job_ids), "RQ finished a job the API never accepted, or lost one"
    assert max(finished.values()) == 1, "a job finished twice in RQ"
    for queue in queues:
        for job_id in FinishedJobRegistry(queue=queue).get_job_ids():
            assert queue.name == f"{PREFIX}-lanczos-{priority_of[job_id]}", (job_id, queue.name)
    assert not redis.hgetall(f"{PREFIX}:running"), "jobs still marked running"

    # Figures.
    latencies = [seconds(r["created_at"], r["finished_at"]) for r in records.values()]
    queue_waits = [seconds(r["created_at"], r["started_at"]) for r in records.values()]
    first = min(datetime.fromisoformat(r["created_at"]) for r in records.values())
    last = max(datetime.fromisoformat(r["finished_at"]) for r in records.values())
    span = (last - first).total_seconds()
    figures: dict[str, object] = {
        "jobs": JOBS,
        "workers": WORKERS,
        "submit_threads": SUBMIT_THREADS,
        "image": "16x16 PNG, Lanczos x2",
        "submit_seconds": round(submit_seconds, 3),
        "uploads_per_second": round(JOBS / submit_seconds, 1),
        "drain_seconds": round(drained_seconds, 3),
        "throughput_jobs_per_second": round(JOBS / span, 1),
        "latency_p50_seconds": round(percentile(latencies, 50), 3),
        "latency_p99_seconds": round(percentile(latencies, 99), 3),
        "latency_mean_seconds": round(statistics.fmean(latencies), 3),
        "latency_max_seconds": round(max(latencies), 3),
        "queue_wait_p50_seconds": round(percentile(queue_waits, 50), 3),
        "queue_wait_p99_seconds": round(percentile(queue_waits, 99), 3),
        "jobs_per_worker": dict(per_worker),
    }
    for priority in PRIORITIES:  # low waits behind high and default while uploads continue
        of_priority = [
            seconds(r["created_at"], r["finished_at"])
            for r in records.values()
            if r["priority"] == priority
        ]
        figures[f"latency_p50_seconds_{priority}"] = round(percentile(of_priority, 50), 3)
        figures[f"latency_p99_seconds_{priority}"] = round(percentile(of_priority, 99), 3)
    for name, value in figures.items():
        record_property(name, value)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"load-{JOBS}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(
        f"\nload: {JOBS} jobs, {WORKERS} workers: {figures['throughput_jobs_per_second']} jobs/s, "
        f"end-to-end p50 {figures['latency_p50_seconds']} s, "
        f"p99 {figures['latency_p99_seconds']} s, "
        f"uploads {figures['uploads_per_second']}/s ({json.dumps(figures)})"
    )
