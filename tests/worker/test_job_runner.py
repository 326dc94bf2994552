"""The worker's job runner in-process, with a real Redis, real storage and the Lanczos upscaler."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from redis import Redis

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
from core.records import JobStore
from core.settings import Settings
from core.storage import LocalStorage
from core.workers import WorkerRegistry
from model.lanczos import LanczosUpscaler
from tests.conftest import png_bytes
from worker.runtime import WorkerRuntime
from worker.tasks import JobRunner


@pytest.fixture
def runtime(settings: Settings, tmp_path: Path) -> WorkerRuntime:
    connection = Redis.from_url(settings.redis.url or "")
    return WorkerRuntime(
        settings=settings,
        name="test-worker",
        upscaler=LanczosUpscaler(),
        storage=LocalStorage(tmp_path / "storage"),
        jobs=JobStore(connection, prefix="spasemsr", ttl_seconds=600),
        registry=WorkerRegistry(connection, prefix="spasemsr"),
        warmup_seconds=0.0,
    )


def _submit(runtime: WorkerRuntime, data: bytes, **parameters: object) -> JobPayload:
    job_id = new_job_id()
    params = JobParameters.model_validate(parameters)
    image = Image.open(io.BytesIO(data))
    info = ImageInfo(
        width=image.width, height=image.height, format=ImageFormat.PNG, bytes=len(data)
    )
    payload = JobPayload(
        job_id=job_id,
        input_key=input_key_for(job_id),
        output_key=output_key_for(job_id, params.output_format),
        input=info,
        parameters=params,
    )
    runtime.storage.put(payload.input_key, data, content_type="image/png")
    runtime.jobs.create(
        JobRecord(
            id=job_id,
            status=JobStatus.QUEUED,
            priority=Priority.DEFAULT,
            parameters=params,
            input=info,
            input_key=payload.input_key,
            output_key=payload.output_key,
            created_at=utcnow(),
        )
    )
    return payload


def test_success_writes_the_result_and_timings(runtime: WorkerRuntime) -> None:
    payload = _submit(runtime, png_bytes(9, 7), scale=4, output_format="webp")
    assert JobRunner(runtime, payload).run() == {"status": "succeeded"}
    record = runtime.jobs.get(payload.job_id)
    assert record.status is JobStatus.SUCCEEDED
    assert record.worker == "test-worker"
    assert record.output is not None and (record.output.width, record.output.height) == (36, 28)
    result = Image.open(io.BytesIO(runtime.storage.get(payload.output_key)))
    assert (result.format, result.size) == ("WEBP", (36, 28))
    assert not runtime.storage.exists(payload.input_key)  # inputs are not kept once done
    assert {"queue_wait", "read", "upscale", "write", "total"} <= set(record.timings)


def test_cancel_requested_while_running_stops_at_the_next_step(runtime: WorkerRuntime) -> None:
    payload = _submit(runtime, png_bytes())
    runtime.jobs.request_cancel(payload.job_id)
    assert JobRunner(runtime, payload).run() == {"status": "canceled"}
    record = runtime.jobs.get(payload.job_id)
    assert record.status is JobStatus.CANCELED
    assert record.error is not None and record.error.type == "job-canceled"
    assert not runtime.storage.exists(payload.output_key)


def test_job_canceled_while_queued_is_skipped(runtime: WorkerRuntime) -> None:
    payload = _submit(runtime, png_bytes())
    runtime.jobs.transition(payload.job_id, from_statuses=[JobStatus.QUEUED], to=JobStatus.CANCELED)
    assert JobRunner(runtime, payload).run() == {"status": "skipped"}
    assert runtime.jobs.get(payload.job_id).status is JobStatus.CANCELED


def test_missing_input_fails_with_a_typed_error(runtime: WorkerRuntime) -> None:
    payload = _submit(runtime, png_bytes())
    runtime.storage.delete(payload.input_key)
    assert JobRunner(runtime, payload).run() == {"status": "failed"}
    error = runtime.jobs.get(payload.job_id).error
    assert error is not None
    assert (error.type, error.title) == ("input-missing", "Job input missing")


def test_an_upscaler_crash_fails_the_job_without_leaking_internals(
    runtime: WorkerRuntime,
) -> None:
    payload = _submit(runtime, png_bytes())
    runtime.storage.put(payload.input_key, b"\x89PNG\r\n\x1a\n garbage", content_type="image/png")
    assert JobRunner(runtime, payload).run() == {"status": "failed"}
    error = runtime.jobs.get(payload.job_id).error
    assert error is not None
    assert error.type == "upscale-failed"
    assert "Traceback" not in error.detail and "PIL" not in error.detail


def test_progress_is_written_to_the_record(runtime: WorkerRuntime) -> None:
    payload = _submit(runtime, png_bytes())
    seen: list[tuple[str, int, int]] = []
    runner = JobRunner(runtime, payload)
    runtime.jobs.transition(
        payload.job_id, from_statuses=[JobStatus.QUEUED], to=JobStatus.PROCESSING
    )
    for stage, step, total in [("denoise", 1, 3), ("denoise", 2, 3)]:
        runner._on_progress(stage, step, total)
        progress = runtime.jobs.get(payload.job_id).progress
        seen.append((progress.stage, progress.step, progress.total))
    assert seen == [("denoise", 1, 3), ("denoise", 2, 3)]
