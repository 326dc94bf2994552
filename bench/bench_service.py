"""Service benchmark with the Lanczos upscaler: queue latency, job latency, upload rate.

    python bench/bench_service.py --jobs 200

Starts its own redis-server, API (uvicorn) and worker processes on loopback, like
``spasemsr serve``; prints a table. Figures, not pass/fail: this machine is shared and noisy.

The upload rate is set beside an anchor measured in the same run by the same client: a
minimal FastAPI endpoint (``anchor_app``, one python-multipart upload written to local
storage and one Redis LPUSH) under uvicorn in its own process, like the API, both without
workers, in alternating rounds. The client is one ``httpx.Client`` (one connection pool)
shared by ``--concurrency`` threads, sending a multipart body encoded once, so what is
measured is the server, not the client. Beside uploads/s and latencies, the CPU each server
process (and Redis) spent per upload: on a busy machine the steadier comparison.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated

import httpx
import psutil
from fastapi import FastAPI, File, UploadFile, status
from redis import Redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.embedded_redis import EmbeddedRedis  # noqa: E402
from tests.conftest import ServiceProcesses, png_bytes, start_service  # noqa: E402

ANCHOR_REDIS_ENV = "SPASEMSR_BENCH_ANCHOR_REDIS_URL"
ANCHOR_STORAGE_ENV = "SPASEMSR_BENCH_ANCHOR_STORAGE"
UPLOAD_FORM = {"scale": "2"}
ANCHOR = "anchor (minimal FastAPI)"
SERVICE = "SpaSemSR Serve POST /v1/jobs"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


# --- the anchor: the least a FastAPI upload endpoint can do ----------------------------------


def anchor_app() -> FastAPI:
    """A minimal FastAPI + python-multipart endpoint: store the file, push one Redis entry.

    Served by ``uvicorn --factory bench.bench_service:anchor_app``."""
    redis = Redis.from_url(os.environ[ANCHOR_REDIS_ENV])
    storage = Path(os.environ[ANCHOR_STORAGE_ENV])
    storage.mkdir(parents=True, exist_ok=True)
    app = FastAPI()

    # A plain ``def``: FastAPI runs it in its thread pool, the usual minimal endpoint.
    @app.post("/v1/jobs", status_code=status.HTTP_202_ACCEPTED)
    def upload(image: Annotated[UploadFile, File()]) -> dict[str, str]:
        job_id = uuid.uuid4().hex
        (storage / job_id).write_bytes(image.file.read())
        redis.lpush("bench:anchor", job_id)
        return {"id": job_id}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


class AnchorProcess(ServiceProcesses):
    """The anchor under uvicorn in its own process, started like the API."""

    def __init__(self, redis_url: str, work: Path) -> None:
        env = {ANCHOR_REDIS_ENV: redis_url, ANCHOR_STORAGE_ENV: str(work / "anchor-storage")}
        super().__init__(env, work)

    def start_api(self) -> None:
        self.api = self._spawn(
            [sys.executable, "-m", "uvicorn", "--factory", "bench.bench_service:anchor_app",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
            "anchor.log",
        )  # fmt: skip
        self._wait_for("/healthz", timeout=30)


# --- measurements ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """One multipart body, encoded once: httpx streams ``files=`` in several small writes,
    which costs the client more than the server and makes it wait on TCP (Nagle, delayed ACK)."""

    body: bytes
    headers: dict[str, str]

    @classmethod
    def of(cls, image: bytes) -> Upload:
        request = httpx.Request(
            "POST",
            "http://bench/",
            files={"image": ("a.png", image, "image/png")},
            data=UPLOAD_FORM,
        )
        return cls(request.read(), {"content-type": request.headers["content-type"]})


def post_upload(client: httpx.Client, upload: Upload) -> httpx.Response:
    return client.post("/v1/jobs", content=upload.body, headers=upload.headers)


def shared_client(url: str, concurrency: int) -> httpx.Client:
    """One client, one connection pool, for all the threads of a phase."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.Client(base_url=url, timeout=60, limits=limits)


def wait_done(client: httpx.Client, job_id: str) -> dict[str, str]:
    while True:
        job: dict[str, str] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in {"succeeded", "failed", "canceled"}:
            return job
        time.sleep(0.005)


def latency_phase(client: httpx.Client, upload: Upload, jobs: int) -> dict[str, list[float]]:
    """One job at a time on an idle service: what a single client sees."""
    to_start, end_to_end, client_seen = [], [], []
    for _ in range(jobs):
        began = time.perf_counter()
        created = post_upload(client, upload)
        job = wait_done(client, created.json()["id"])
        client_seen.append(time.perf_counter() - began)
        assert job["status"] == "succeeded", job
        to_start.append(seconds_between(job["created_at"], job["started_at"]))
        end_to_end.append(seconds_between(job["created_at"], job["finished_at"]))
    return {"POST -> worker start": to_start, "POST -> finished (server)": end_to_end,
            "POST -> result seen (client)": client_seen}  # fmt: skip


def throughput_phase(url: str, upload: Upload, jobs: int, concurrency: int) -> tuple[float, float]:
    """Uploads from ``concurrency`` threads over one shared client, then until all are done."""
    with shared_client(url, concurrency) as client:

        def submit(_: int) -> str:
            response = post_upload(client, upload)
            response.raise_for_status()
            return str(response.json()["id"])

        began = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            ids = list(pool.map(submit, range(jobs)))
        upload_seconds = time.perf_counter() - began
        for job_id in ids:
            wait_done(client, job_id)
    return jobs / upload_seconds, jobs / (time.perf_counter() - began)


@dataclass
class UploadRun:
    uploads: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    server_cpu: float = 0.0
    """CPU seconds of the server process (event loop and its threads)."""
    redis_cpu: float = 0.0

    @property
    def per_second(self) -> float:
        return self.uploads / self.seconds

    def row(self) -> str:
        """uploads/s, p50 and p99 ms, then CPU ms per upload of the server and of Redis."""
        return (
            f"{self.per_second:9.1f} {percentile(self.latencies, 50) * 1e3:9.2f} "
            f"{percentile(self.latencies, 99) * 1e3:9.2f} "
            f"{self.server_cpu / self.uploads * 1e3:11.2f} "
            f"{self.redis_cpu / self.uploads * 1e3:13.3f}"
        )

    def add(self, other: UploadRun) -> None:
        self.uploads += other.uploads
        self.seconds += other.seconds
        self.latencies += other.latencies
        self.server_cpu += other.server_cpu
        self.redis_cpu += other.redis_cpu


@dataclass(frozen=True)
class Target:
    url: str
    server: psutil.Process
    redis: psutil.Process


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def upload_rate(target: Target, upload: Upload, uploads: int, concurrency: int) -> UploadRun:
    """``uploads`` POSTs from ``concurrency`` threads sharing one client (connected first);
    with the CPU the server and Redis spent meanwhile, a figure that a busy machine blurs less
    than rates and latencies."""
    with shared_client(target.url, concurrency) as client:

        def timed(_: int) -> float:
            began = time.perf_counter()
            response = post_upload(client, upload)
            if response.status_code != 202:
                raise RuntimeError(f"upload answered {response.status_code}: {response.text}")
            return time.perf_counter() - began

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda _: client.get("/healthz"), range(concurrency)))
            server_cpu, redis_cpu = cpu_seconds(target.server), cpu_seconds(target.redis)
            began = time.perf_counter()
            latencies = list(pool.map(timed, range(uploads)))
            seconds = time.perf_counter() - began
        return UploadRun(
            uploads,
            seconds,
            latencies,
            server_cpu=cpu_seconds(target.server) - server_cpu,
            redis_cpu=cpu_seconds(target.redis) - redis_cpu,
        )


def compare_with_anchor(
    targets: dict[str, Target], upload: Upload, *, uploads: int, rounds: int, concurrency: int
) -> dict[str, UploadRun]:
    """Each target in turn, ``rounds`` times (a warm-up first), so that a noisy moment on a
    shared machine does not land on one side only; the rounds are pooled."""
    pooled = {name: UploadRun() for name in targets}
    for target in targets.values():
        upload_rate(target, upload, min(uploads, 200), concurrency)  # warm-up: imports, caches
    for _ in range(rounds):
        for name, target in targets.items():
            pooled[name].add(upload_rate(target, upload, uploads, concurrency))
    return pooled


def stop_workers(service: ServiceProcesses) -> None:
    """The upload comparison runs without workers: the anchor has none either."""
    for worker in service.workers:
        worker.terminate()
    for worker in service.workers:
        worker.wait(timeout=30)
    service.workers.clear()


# --- report ----------------------------------------------------------------------------------


def print_report(
    args: argparse.Namespace,
    latencies: dict[str, list[float]],
    uploads_per_s: float,
    jobs_per_s: float,
    compared: dict[str, UploadRun],
) -> None:
    print(f"\nSpaSemSR Serve, Lanczos x2 on {args.size}x{args.size} PNG, {args.workers} worker(s), "
          f"{args.jobs} jobs per phase")  # fmt: skip
    print(f"{'measure':34} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9}")
    for name, values in latencies.items():
        print(f"{name:34} {percentile(values, 50) * 1e3:9.1f} {percentile(values, 99) * 1e3:9.1f} "
              f"{statistics.fmean(values) * 1e3:9.1f}")  # fmt: skip
    print(
        f"{'uploads accepted per second':34} {uploads_per_s:9.1f}  (concurrency {args.concurrency})"
    )
    print(f"{'jobs completed per second':34} {jobs_per_s:9.1f}")

    print(f"\nUpload rate beside a minimal FastAPI endpoint (store + one LPUSH), no workers, "
          f"concurrency {args.concurrency}, {args.rounds} x {args.uploads} uploads")  # fmt: skip
    print(f"{'endpoint':34} {'uploads/s':>9} {'p50 ms':>9} {'p99 ms':>9} "
          f"{'API CPU ms':>11} {'Redis CPU ms':>13}  (CPU per upload)")  # fmt: skip
    for name, run in compared.items():
        print(f"{name:34} {run.row()}")
    anchor, service = compared[ANCHOR], compared[SERVICE]
    print(f"{'anchor / service, uploads/s':34} {anchor.per_second / service.per_second:9.2f}  "
          "(goal: within 2x)")  # fmt: skip
    cpu = (service.server_cpu / service.uploads) / (anchor.server_cpu / anchor.uploads)
    print(f"{'service / anchor, API CPU':34} {cpu:9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--size", type=int, default=64, help="input side in pixels")
    parser.add_argument("--uploads", type=int, default=1000,
                        help="uploads per round of the comparison with the anchor")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ssr-bench-"))
    upload = Upload.of(png_bytes(args.size, args.size))
    with EmbeddedRedis(work / "redis", appendonly=True) as redis:
        service = start_service(redis.url, work, workers=args.workers,
                                SPASEMSR_WORKER__MODELS='["lanczos"]',
                                SPASEMSR_MODEL__DEFAULT="lanczos",
                                SPASEMSR_API__MAX_QUEUE_DEPTH="1000000",
                                SPASEMSR_API__RATE_LIMIT_PER_MINUTE="0")  # fmt: skip
        anchor = AnchorProcess(redis.url, work)
        try:
            anchor.start_api()
            with httpx.Client(base_url=service.url, timeout=60) as client:
                latencies = latency_phase(client, upload, args.jobs)
            uploads_per_s, jobs_per_s = throughput_phase(
                service.url, upload, args.jobs, args.concurrency
            )
            stop_workers(service)
            redis_process = psutil.Process(redis.process.pid) if redis.process else None
            assert redis_process is not None and anchor.api and service.api
            targets = {
                ANCHOR: Target(anchor.url, psutil.Process(anchor.api.pid), redis_process),
                SERVICE: Target(service.url, psutil.Process(service.api.pid), redis_process),
            }
            compared = compare_with_anchor(
                targets,
                upload,
                uploads=args.uploads,
                rounds=args.rounds,
                concurrency=args.concurrency,
            )
        finally:
            anchor.stop()
            service.stop()
    shutil.rmtree(work, ignore_errors=True)  # thousands of stored uploads
    print_report(args, latencies, uploads_per_s, jobs_per_s, compared)


if __name__ == "__main__":
    main()
