"""``AsyncSpaSemSRClient`` against live services."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import pytest
from PIL import Image
from spasemsr_client import AsyncSpaSemSRClient, JobStatus, Overloaded, RetryPolicy
from spasemsr_client.errors import JobNotFound, UnsupportedImage
from spasemsr_client.models import Job

from tests.conftest import ServiceProcesses, png_bytes


def test_concurrent_jobs_with_async_progress_and_download(
    service: ServiceProcesses, tmp_path: Path
) -> None:
    seen: dict[str, list[str]] = {}

    async def record(job: Job) -> None:
        await asyncio.sleep(0)
        seen.setdefault(job.id, []).append(job.status.value)

    async def one(client: AsyncSpaSemSRClient, width: int) -> tuple[Job, Path]:
        job = await client.submit(png_bytes(width, 16), filename=f"{width}.png", scale=2)
        job = await client.wait(job.id, on_progress=record, poll_interval=0.05)
        return job, await client.download(job.id, tmp_path / f"{width}.png")

    async def main() -> list[tuple[Job, Path]]:
        async with AsyncSpaSemSRClient(service.url) as client:
            model = await client.model()
            assert model.name == "lanczos"
            return await asyncio.gather(*(one(client, w) for w in (16, 20, 24)))

    results = asyncio.run(main())
    for (job, path), width in zip(results, (16, 20, 24), strict=True):
        assert job.status is JobStatus.SUCCEEDED
        assert Image.open(io.BytesIO(path.read_bytes())).size == (width * 2, 32)
        assert seen[job.id][-1] == "succeeded"


def test_async_errors_are_typed(service: ServiceProcesses) -> None:
    async def main() -> None:
        async with AsyncSpaSemSRClient(service.url) as client:
            with pytest.raises(UnsupportedImage):
                await client.submit(b"GIF89a", filename="x.gif")
            with pytest.raises(JobNotFound):
                await client.get("f" * 32)

    asyncio.run(main())


def test_async_429_honours_retry_after(idle_service: ServiceProcesses) -> None:
    async def main() -> float:
        async with AsyncSpaSemSRClient(idle_service.url, retry=RetryPolicy(retries=0)) as client:
            blocker = await client.submit(png_bytes(), filename="a.png")
            with pytest.raises(Overloaded) as full:
                await client.submit(png_bytes(), filename="b.png")
            assert full.value.retry_after == 1.0

            async def release() -> None:
                await asyncio.sleep(0.3)
                await client.cancel(blocker.id)

            retrying = AsyncSpaSemSRClient(idle_service.url, retry=RetryPolicy(retries=3))
            async with retrying:
                began = time.monotonic()
                accepted, _ = await asyncio.gather(
                    retrying.submit(png_bytes(), filename="b.png"), release()
                )
                waited = time.monotonic() - began
                await retrying.cancel(accepted.id)
            return waited

    waited = asyncio.run(main())
    assert 0.9 <= waited < 5, waited
