"""``spasemsr bench``: load a running service with jobs and report what clients see.

Figures, not pass/fail: upload latency, queue wait and processing time (from the service's
own timestamps), end-to-end latency seen by the client, and throughput.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

from spasemsr_client import AsyncSpaSemSRClient, RetryPolicy
from spasemsr_client._common import JobOptions
from spasemsr_client.errors import ClientError
from spasemsr_client.models import Job, JobStatus


@dataclass
class BenchReport:
    jobs: int
    concurrency: int
    wall_seconds: float
    outcomes: dict[str, int]
    series: dict[str, list[float]] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Succeeded jobs per second of wall time."""
        return self.outcomes.get("succeeded", 0) / self.wall_seconds if self.wall_seconds else 0.0

    def summary(self) -> dict[str, dict[str, float]]:
        return {name: summarise(values) for name, values in self.series.items() if values}

    def as_json(self) -> dict[str, object]:
        return {
            "jobs": self.jobs,
            "concurrency": self.concurrency,
            "wall_seconds": round(self.wall_seconds, 4),
            "throughput_jobs_per_second": round(self.throughput, 3),
            "outcomes": self.outcomes,
            "seconds": self.summary(),
        }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100])."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summarise(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 50), 4),
        "p95": round(percentile(values, 95), 4),
        "p99": round(percentile(values, 99), 4),
        "mean": round(statistics.fmean(values), 4),
        "max": round(max(values), 4),
    }


@dataclass
class _Sample:
    upload: float
    end_to_end: float
    job: Job | None
    error: str | None = None


async def run_bench(
    url: str,
    image: bytes,
    *,
    jobs: int,
    concurrency: int,
    options: JobOptions,
    timeout: float,
    api_key: str | None = None,
    model: str | None = None,
) -> BenchReport:
    limit = asyncio.Semaphore(concurrency)
    retry = RetryPolicy(retries=20, max_wait=10.0)
    async with AsyncSpaSemSRClient(url, timeout=timeout, retry=retry, api_key=api_key) as client:

        async def one() -> _Sample:
            async with limit:
                return await _one_job(client, image, options, timeout, model)

        began = time.perf_counter()
        samples = await asyncio.gather(*(one() for _ in range(jobs)))
        wall = time.perf_counter() - began
    return _report(samples, jobs=jobs, concurrency=concurrency, wall=wall)


async def _one_job(
    client: AsyncSpaSemSRClient,
    image: bytes,
    options: JobOptions,
    timeout: float,
    model: str | None = None,
) -> _Sample:
    began = time.perf_counter()
    try:
        job = await client.submit(image, model=model, filename="bench.png", **options)
        uploaded = time.perf_counter() - began
        job = await client.wait(job.id, timeout=timeout, poll_interval=0.02, raise_on_failure=False)
    except ClientError as error:
        elapsed = time.perf_counter() - began
        return _Sample(upload=elapsed, end_to_end=elapsed, job=None, error=type(error).__name__)
    return _Sample(upload=uploaded, end_to_end=time.perf_counter() - began, job=job)


def _report(samples: list[_Sample], *, jobs: int, concurrency: int, wall: float) -> BenchReport:
    outcomes: dict[str, int] = {}
    series: dict[str, list[float]] = {
        "upload": [],
        "queue_wait": [],
        "processing": [],
        "end_to_end": [],
    }
    for sample in samples:
        outcome = sample.error or (sample.job.status.value if sample.job else "unknown")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        job = sample.job
        if job is None or job.status is not JobStatus.SUCCEEDED:
            continue
        series["upload"].append(sample.upload)
        series["end_to_end"].append(sample.end_to_end)
        if job.started_at and job.finished_at:
            series["queue_wait"].append((job.started_at - job.created_at).total_seconds())
            series["processing"].append((job.finished_at - job.started_at).total_seconds())
    return BenchReport(
        jobs=jobs, concurrency=concurrency, wall_seconds=wall, outcomes=outcomes, series=series
    )
