"""Chaos: kill -9 a worker mid-job, restart redis-server with AOF mid-queue, stop the S3 server,
SIGTERM a busy worker, jobs past their time limits. Every accepted job completes exactly once
(or ends with its own clear error), with real processes on loopback and bounded waits.
"""

from __future__ import annotations

import io
import json
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from redis import Redis

from core.embedded_redis import EmbeddedRedis
from core.redis_conn import text
from tests.conftest import free_port, png_bytes, start_service, wait_for_status

FAST_RECOVERY = {
    "SPASEMSR_WORKER__MODELS": '["lanczos"]',
    "SPASEMSR_MODEL__DEFAULT": "lanczos",
    "SPASEMSR_WORKER__HEARTBEAT_SECONDS": "0.5",
    "SPASEMSR_WORKER__RETRY_BACKOFF_SECONDS": "0.5",
    "SPASEMSR_API__RATE_LIMIT_PER_MINUTE": "0",
}


def slow_image() -> bytes:
    """The largest input (2048², x4 = 8192² out): seconds of resampling and encoding even on a
    quiet machine, in a few kilobytes of upload."""
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((2048, 2048)).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def aof_redis() -> Iterator[EmbeddedRedis]:
    directory = Path(tempfile.mkdtemp(prefix="ssr-aof-"))
    server = EmbeddedRedis(directory, appendonly=True).start()
    yield server
    server.stop()


def _submit(client: httpx.Client, data: bytes, **form: str) -> str:
    response = client.post("/v1/jobs", files={"image": ("a.png", data, "image/png")}, data=form)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _wait_all(
    client: httpx.Client, ids: list[str], timeout: float = 180
) -> list[dict[str, object]]:
    return [wait_for_status(client, i, {"succeeded", "failed", "canceled"}, timeout) for i in ids]


def _record(redis_url: str, job_id: str) -> dict[str, object]:
    raw = Redis.from_url(redis_url).hgetall(f"spasemsr:job:{job_id}")
    return {text(k): json.loads(v) for k, v in raw.items() if text(k) != "cancel_requested"}


def _results(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "var" / "storage" / "results").glob("*"))


def _wait_processing(client: httpx.Client, job_id: str) -> dict[str, object]:
    job = wait_for_status(client, job_id, {"processing", "succeeded", "failed"}, 60)
    assert job["status"] == "processing", f"the job ended before the fault: {job}"
    return job


def _wait_held_by_new_worker(redis_url: str, job_id: str, not_these: set[str]) -> str:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        record = _record(redis_url, job_id)
        worker = record.get("worker")
        if record["status"] == "processing" and worker and worker not in not_these:
            return str(worker)
        time.sleep(0.05)
    raise TimeoutError(f"no live worker picked up {job_id}")


def _wait_for_stage(client: httpx.Client, job_id: str, stage: str) -> None:
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{job_id}").json()["progress"]["stage"] != stage:
        assert time.monotonic() < deadline, f"job {job_id} never reached {stage}"
        time.sleep(0.01)


def _pid_of(worker_name: str) -> int:
    return int(worker_name.rsplit("-", 2)[1])  # names are <host>-<pid>-<suffix>


def test_kill_9_mid_job_is_recovered_by_another_worker(
    aof_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    service = start_service(aof_redis.url, tmp_path, workers=2, **FAST_RECOVERY)
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            victim = _submit(client, slow_image(), scale="4")
            others = [_submit(client, png_bytes(), scale="2") for _ in range(5)]
            job = _wait_processing(client, victim)
            os.kill(_pid_of(str(_record(aof_redis.url, victim)["worker"])), signal.SIGKILL)
            finished = _wait_all(client, [victim, *others])
        assert [j["status"] for j in finished] == ["succeeded"] * 6, finished
        assert _record(aof_redis.url, victim)["attempts"] == 2  # once killed, once completed
        assert _record(aof_redis.url, victim)["worker"] != job.get("worker")
        assert all(_record(aof_redis.url, i)["attempts"] == 1 for i in others)
        assert len(_results(tmp_path)) == 6  # exactly one result per job
        assert Redis.from_url(aof_redis.url).hlen("spasemsr:running") == 0
    finally:
        service.stop()


def test_a_job_that_keeps_killing_workers_fails_instead_of_looping(
    aof_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    service = start_service(
        aof_redis.url, tmp_path, workers=1, SPASEMSR_WORKER__MAX_ATTEMPTS="2", **FAST_RECOVERY
    )
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            poison = _submit(client, slow_image(), scale="4")
            killed: set[str] = set()
            for _ in range(2):
                holder = _wait_held_by_new_worker(aof_redis.url, poison, killed)
                os.kill(_pid_of(holder), signal.SIGKILL)
                killed.add(holder)
                service.workers.pop(0).wait()
                service.start_worker(wait_ready=False)  # what a supervisor does
            job = wait_for_status(client, poison, {"succeeded", "failed"}, 90)
        assert job["status"] == "failed"
        error = job["error"]
        assert isinstance(error, dict) and error["type"] == "worker-lost"
        assert "died 2 times" in error["detail"]
    finally:
        service.stop()


def test_redis_restart_mid_queue_loses_nothing(aof_redis: EmbeddedRedis, tmp_path: Path) -> None:
    service = start_service(aof_redis.url, tmp_path, workers=0, **FAST_RECOVERY)
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            accepted = [_submit(client, png_bytes(), scale="2") for _ in range(8)]
            aof_redis.stop()
            down = client.post("/v1/jobs", files={"image": ("a.png", png_bytes())})
            assert down.status_code == 503
            assert down.headers["content-type"] == "application/problem+json"
            assert client.get("/readyz").status_code == 503
            aof_redis.start()  # same directory: replays the append-only file
            deadline = time.monotonic() + 30
            while client.get(f"/v1/jobs/{accepted[0]}").status_code != 200:
                assert time.monotonic() < deadline, "the API did not reconnect by itself"
                time.sleep(0.2)
            accepted.append(_submit(client, png_bytes(), scale="2"))
            service.start_worker()
            finished = _wait_all(client, accepted)
        assert [j["status"] for j in finished] == ["succeeded"] * 9
        assert len(_results(tmp_path)) == 9
    finally:
        service.stop()


def test_redis_restart_under_a_running_worker(aof_redis: EmbeddedRedis, tmp_path: Path) -> None:
    service = start_service(aof_redis.url, tmp_path, workers=1, **FAST_RECOVERY)
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            first = [_submit(client, png_bytes(), scale="2") for _ in range(3)]
            _wait_all(client, first)
            aof_redis.stop()
            time.sleep(2)
            aof_redis.start()
            deadline = time.monotonic() + 30
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"never ready again\n{service.logs()}"
                time.sleep(0.3)
            second = [_submit(client, png_bytes(), scale="2") for _ in range(3)]
            finished = _wait_all(client, first + second, timeout=60)
        assert [j["status"] for j in finished] == ["succeeded"] * 6
    finally:
        service.stop()


def test_storage_outage_answers_503_and_the_worker_retries_its_upload(
    aof_redis: EmbeddedRedis, tmp_path: Path, s3_env: dict[str, str]
) -> None:
    from moto.server import ThreadedMotoServer

    # A private S3 server for this test, on its own port, that can be stopped and restarted.
    own_port = free_port()
    own_endpoint = f"http://127.0.0.1:{own_port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=own_port, verbose=False)
    server.start()
    env = {**s3_env, "SPASEMSR_STORAGE__S3_ENDPOINT_URL": own_endpoint}
    service = start_service(aof_redis.url, tmp_path, workers=1, **env, **FAST_RECOVERY)
    try:
        with httpx.Client(base_url=service.url, timeout=60) as client:
            job_id = _submit(client, slow_image(), scale="4")
            _wait_for_stage(client, job_id, "write")  # input read, result being encoded
            server.stop()  # the worker's result upload now fails, and is retried
            refused = client.post("/v1/jobs", files={"image": ("a.png", png_bytes())})
            assert refused.status_code == 503
            assert refused.json()["title"] == "Object storage unavailable"
            assert client.get("/readyz").json()["checks"]["storage"].startswith("unavailable")
            time.sleep(1.0)
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=own_port, verbose=False)
            server.start()  # moto keeps its buckets in-process: the same storage comes back
            job = wait_for_status(client, job_id, {"succeeded", "failed"}, 90)
            assert job["status"] == "succeeded", job["error"]
            assert client.get("/readyz").status_code == 200
            assert client.get(f"/v1/jobs/{job_id}/result").status_code == 200
    finally:
        service.stop()
        server.stop()


def test_sigterm_lets_the_current_job_finish(aof_redis: EmbeddedRedis, tmp_path: Path) -> None:
    service = start_service(aof_redis.url, tmp_path, workers=1, **FAST_RECOVERY)
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            job_id = _submit(client, slow_image(), scale="4")
            _wait_processing(client, job_id)
            worker = service.workers[0]
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=120) == 0
            assert wait_for_status(client, job_id, {"succeeded"}, 5)["status"] == "succeeded"
    finally:
        service.stop()


def test_after_the_grace_period_the_job_is_handed_back(
    aof_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    service = start_service(
        aof_redis.url, tmp_path, workers=1, SPASEMSR_WORKER__SHUTDOWN_GRACE_SECONDS="0",
        **FAST_RECOVERY,
    )  # fmt: skip
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            job_id = _submit(client, slow_image(), scale="4")
            _wait_processing(client, job_id)
            service.workers[0].send_signal(signal.SIGTERM)
            assert service.workers[0].wait(timeout=120) == 0
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] == "queued", job  # back in line, not lost, not failed
            assert _record(aof_redis.url, job_id)["attempts"] == 0  # a shutdown is no fault
            service.workers.pop(0)
            service.start_worker()
            assert wait_for_status(client, job_id, {"succeeded"}, 90)["status"] == "succeeded"
    finally:
        service.stop()


def test_queue_ttl_and_run_timeout_end_with_their_own_errors(
    aof_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    service = start_service(
        aof_redis.url, tmp_path, workers=0, SPASEMSR_WORKER__QUEUE_TTL_SECONDS="3",
        SPASEMSR_WORKER__JOB_TIMEOUT_SECONDS="1", **FAST_RECOVERY,
    )  # fmt: skip
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            stale = _submit(client, png_bytes(), scale="2")
            time.sleep(3.5)
            job = client.get(f"/v1/jobs/{stale}").json()
            assert job["status"] == "failed" and job["error"]["type"] == "queue-timeout", job
            assert Redis.from_url(aof_redis.url).llen("rq:queue:spasemsr-lanczos-default") == 0
            service.start_worker()
            slow = _submit(client, slow_image(), scale="4")
            job = wait_for_status(client, slow, {"succeeded", "failed"}, 60)
            error = job["error"]
            assert job["status"] == "failed" and isinstance(error, dict), job
            assert error["type"] == "run-timeout", job
            quick = _submit(client, png_bytes(), scale="2")  # the worker is still fine
            assert wait_for_status(client, quick, {"succeeded"}, 30)["status"] == "succeeded"
    finally:
        service.stop()
