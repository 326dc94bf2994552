"""The worker's job runner in-process, with a real Redis, real storage and the Lanczos upscaler."""

from __future__ import annotations

import io
from dataclasses import replace
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
from core.models import ModelName
from core.records import JobStore
from core.settings import Settings
from core.storage import LocalStorage
from core.workers import WorkerRegistry
from model.upscalers.lanczos import LanczosUpscaler
from tests.conftest import png_bytes
from worker import imaging
from worker.runtime import WorkerRuntime
from worker.tasks import JobRunner


@pytest.fixture
def runtime(settings: Settings, tmp_path: Path) -> WorkerRuntime:
    connection = Redis.from_url(settings.redis.url or "")
    return WorkerRuntime(
        settings=settings,
        name="test-worker",
        upscalers={ModelName.LANCZOS: LanczosUpscaler()},
        storage=LocalStorage(tmp_path / "storage"),
        jobs=JobStore(connection, prefix="spasemsr", ttl_seconds=600),
        registry=WorkerRegistry(connection, prefix="spasemsr"),
        warmup_seconds=0.0,
    )


def _submit(runtime: WorkerRuntime, data: bytes, **parameters: object) -> JobPayload:
    job_id = new_job_id()
    params = JobParameters.model_validate({"model": "lanczos", **parameters})
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


@pytest.mark.parametrize("stop", ["cancel", "second-ctrl-c"])
def test_a_stop_that_comes_while_the_result_is_encoded_is_honoured_before_it_is_stored(
    runtime: WorkerRuntime, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    payload = _submit(runtime, png_bytes())
    encode = imaging.encode

    def encode_then_stop(image: Image.Image, output_format: ImageFormat) -> bytes:
        data = encode(image, output_format)  # the real encoder; the stop comes while it runs
        if stop == "cancel":
            runtime.jobs.request_cancel(payload.job_id)
        else:
            runtime.begin_shutdown(immediately=True)
        return data

    monkeypatch.setattr(imaging, "encode", encode_then_stop)
    outcome = JobRunner(runtime, payload).run()
    assert outcome == ({"status": "canceled"} if stop == "cancel" else {"status": "requeued"})
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


class _DeviceFaults(LanczosUpscaler):
    """The real Lanczos upscaler behind a device that fails the way a GPU does (test edge)."""

    def __init__(self, *, out_of_memory_above: int | None = None, fatal: bool = False) -> None:
        super().__init__()
        self.out_of_memory_above = out_of_memory_above
        self.fatal = fatal
        self.tile_sizes: list[int] = []

    def upscale(self, image, options, *, on_progress=None):  # type: ignore[no-untyped-def]
        import torch

        self.tile_sizes.append(options.tile_size)
        if self.fatal:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if self.out_of_memory_above is not None and options.tile_size > self.out_of_memory_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().upscale(image, options, on_progress=on_progress)


def test_out_of_memory_retries_with_smaller_tiles(runtime: WorkerRuntime) -> None:
    runtime.upscalers[ModelName.LANCZOS] = faulty = _DeviceFaults(out_of_memory_above=256)
    payload = _submit(runtime, png_bytes(), tile_size=1024)
    assert JobRunner(runtime, payload).run() == {"status": "succeeded"}
    assert faulty.tile_sizes == [1024, 512, 256]


def test_out_of_memory_at_the_smallest_tiles_fails_clearly(runtime: WorkerRuntime) -> None:
    runtime.upscalers[ModelName.LANCZOS] = _DeviceFaults(out_of_memory_above=0)
    payload = _submit(runtime, png_bytes(), tile_size=512)
    assert JobRunner(runtime, payload).run() == {"status": "failed"}
    error = runtime.jobs.get(payload.job_id).error
    assert error is not None and error.type == "out-of-memory"


def test_a_fatal_device_error_hands_the_job_back_and_exits(runtime: WorkerRuntime) -> None:
    from core.queue import JobQueue
    from core.recovery import JobRecovery

    connection = Redis.from_url(runtime.settings.redis.url or "")
    queue = JobQueue(connection, prefix="spasemsr")
    runtime.recovery = JobRecovery(
        connection, prefix="spasemsr", jobs=runtime.jobs, queue=queue, registry=runtime.registry,
        max_attempts=3, backoff_seconds=0, job_timeout_seconds=60, keep_seconds=600,
    )  # fmt: skip
    runtime.upscalers[ModelName.LANCZOS] = _DeviceFaults(fatal=True)
    payload = _submit(runtime, png_bytes())
    with pytest.raises(SystemExit) as exit_info:
        JobRunner(runtime, payload).run()
    assert exit_info.value.code == 70  # the supervisor starts a fresh process
    record = runtime.jobs.get(payload.job_id)
    assert record.status is JobStatus.QUEUED and record.attempts == 1
    assert (
        queue.depths()[(ModelName.LANCZOS, Priority.DEFAULT)] == 1
    )  # back in line for another worker


class _Named(LanczosUpscaler):
    """Lanczos under another model's name and training state, to see which one a job runs."""

    def __init__(self, name: str, *, trained: bool) -> None:
        super().__init__()
        self._card = replace(self._card, name=name, trained=trained)
        self.runs = 0

    def upscale(self, image, options, *, on_progress=None):  # type: ignore[no-untyped-def]
        self.runs += 1
        return super().upscale(image, options, on_progress=on_progress)


def test_each_job_runs_on_its_own_model_and_records_whether_it_is_trained(
    runtime: WorkerRuntime,
) -> None:
    untrained = _Named("spasemsr", trained=False)
    runtime.upscalers[ModelName.SPASEMSR] = untrained
    lanczos_job = _submit(runtime, png_bytes())
    spasemsr_job = _submit(runtime, png_bytes(), model="spasemsr")
    assert JobRunner(runtime, lanczos_job).run() == {"status": "succeeded"}
    assert JobRunner(runtime, spasemsr_job).run() == {"status": "succeeded"}
    assert untrained.runs == 1
    assert runtime.jobs.get(lanczos_job.job_id).model_trained is True
    record = runtime.jobs.get(spasemsr_job.job_id)
    assert record.model is ModelName.SPASEMSR and record.model_trained is False


def test_a_job_for_a_model_this_worker_does_not_hold_fails_with_a_clear_error(
    runtime: WorkerRuntime,
) -> None:
    payload = _submit(runtime, png_bytes(), model="realesrgan-x4plus")
    assert JobRunner(runtime, payload).run() == {"status": "failed"}
    error = runtime.jobs.get(payload.job_id).error
    assert error is not None and "lanczos, not realesrgan-x4plus" in error.detail
