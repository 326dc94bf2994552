"""Service benchmark with the Lanczos upscaler: queue latency, job latency, upload rate.

    python bench/bench_service.py --jobs 200

Starts its own redis-server, API (uvicorn) and worker processes on loopback, like
``spasemsr serve``; prints a table. Figures, not pass/fail: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.embedded_redis import EmbeddedRedis  # noqa: E402
from tests.conftest import png_bytes, start_service  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def wait_done(client: httpx.Client, job_id: str) -> dict[str, str]:
    while True:
        job: dict[str, str] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in {"succeeded", "failed", "canceled"}:
            return job
        time.sleep(0.005)


def latency_phase(client: httpx.Client, image: bytes, jobs: int) -> dict[str, list[float]]:
    """One job at a time on an idle service: what a single client sees."""
    to_start, end_to_end, client_seen = [], [], []
    for _ in range(jobs):
        began = time.perf_counter()
        created = client.post("/v1/jobs", files={"image": ("a.png", image, "image/png")},
                              data={"scale": "2"})  # fmt: skip
        job = wait_done(client, created.json()["id"])
        client_seen.append(time.perf_counter() - began)
        assert job["status"] == "succeeded", job
        to_start.append(seconds_between(job["created_at"], job["started_at"]))
        end_to_end.append(seconds_between(job["created_at"], job["finished_at"]))
    return {"POST -> worker start": to_start, "POST -> finished (server)": end_to_end,
            "POST -> result seen (client)": client_seen}  # fmt: skip


def throughput_phase(url: str, image: bytes, jobs: int, concurrency: int) -> tuple[float, float]:
    def upload(_: int) -> str:
        with httpx.Client(base_url=url, timeout=60) as c:
            response = c.post("/v1/jobs", files={"image": ("a.png", image, "image/png")},
                              data={"scale": "2"})  # fmt: skip
            response.raise_for_status()
            return str(response.json()["id"])

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        ids = list(pool.map(upload, range(jobs)))
    upload_seconds = time.perf_counter() - began
    with httpx.Client(base_url=url, timeout=60) as client:
        for job_id in ids:
            wait_done(client, job_id)
    return jobs / upload_seconds, jobs / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--size", type=int, default=64, help="input side in pixels")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ssr-bench-"))
    image = png_bytes(args.size, args.size)
    with EmbeddedRedis(work / "redis", appendonly=True) as redis:
        service = start_service(redis.url, work, workers=args.workers,
                                SPASEMSR_WORKER__MODELS='["lanczos"]',
                                SPASEMSR_MODEL__DEFAULT="lanczos",
                                SPASEMSR_API__MAX_QUEUE_DEPTH="100000",
                                SPASEMSR_API__RATE_LIMIT_PER_MINUTE="0")  # fmt: skip
        try:
            with httpx.Client(base_url=service.url, timeout=60) as client:
                latencies = latency_phase(client, image, args.jobs)
            uploads_per_s, jobs_per_s = throughput_phase(
                service.url, image, args.jobs, args.concurrency
            )
        finally:
            service.stop()

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


if __name__ == "__main__":
    main()
