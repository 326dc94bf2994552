"""Scrape time of ``/metrics`` with N worker processes (default 8), Lanczos upscaler.

    python bench/bench_metrics.py --workers 8 --scrapes 200

Starts its own redis-server, the API and N workers (each with its own metrics port, as in
production), runs a few jobs so that every histogram has data, then times scrapes of the
API's ``/metrics`` (which reads queue depth, oldest age and workers by state from Redis) and
of every worker's. Prints a table. Figures, not pass/fail: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.embedded_redis import EmbeddedRedis  # noqa: E402
from tests.conftest import png_bytes, start_service, wait_for_status  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def time_scrapes(url: str, scrapes: int) -> tuple[list[float], int]:
    timings = []
    size = 0
    with httpx.Client(timeout=30) as client:
        client.get(url).raise_for_status()  # warm the connection
        for _ in range(scrapes):
            began = time.perf_counter()
            answer = client.get(url)
            timings.append(time.perf_counter() - began)
            answer.raise_for_status()
            size = len(answer.content)
    return timings, size


def wait_all_warm(client: httpx.Client, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = client.get("/v1/model")
        if answer.status_code == 200 and answer.json()["workers"] >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"fewer than {count} warm workers after {timeout} s")


def row(name: str, timings: list[float], size: int) -> str:
    ordered = sorted(timings)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return (
        f"{name:<28} {statistics.median(timings) * 1000:8.2f} {p99 * 1000:8.2f} "
        f"{max(timings) * 1000:8.2f} {size:8d}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=16)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ssr-bm-"))
    redis = EmbeddedRedis(work / "r", appendonly=False).start()
    service = start_service(
        redis.url,
        work,
        workers=0,
        SPASEMSR_WORKER__MODELS='["lanczos"]',
        SPASEMSR_MODEL__DEFAULT="lanczos",
    )
    try:
        ports = [free_port() for _ in range(args.workers)]
        for port in ports:
            service.env["SPASEMSR_WORKER__METRICS_PORT"] = str(port)
            service.start_worker(wait_ready=False)
        service.wait_ready(timeout=300)
        with httpx.Client(base_url=service.url, timeout=60) as client:
            wait_all_warm(client, args.workers)
            image = png_bytes(32, 24)
            ids = [
                client.post(
                    "/v1/jobs", files={"image": ("a.png", image)}, data={"scale": "2"}
                ).json()["id"]
                for _ in range(args.jobs)
            ]
            for job_id in ids:
                wait_for_status(client, job_id, {"succeeded"}, timeout=120)

        print(f"/metrics scrape time, {args.workers} worker processes, {args.scrapes} scrapes each")
        print(f"{'target':<28} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'bytes':>8}")
        api_timings, api_size = time_scrapes(f"{service.url}/metrics", args.scrapes)
        print(row("api (Redis read per scrape)", api_timings, api_size))
        all_workers: list[float] = []
        for index, port in enumerate(ports):
            timings, size = time_scrapes(f"http://127.0.0.1:{port}/metrics", args.scrapes)
            all_workers += timings
            print(row(f"worker {index}", timings, size))
        print(row("all workers", all_workers, size))
    finally:
        service.stop()
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
