"""The RQ task that runs one job on this process's warm upscaler.

The API enqueues ``worker.tasks.run_job`` by name with the JSON payload of ``core.jobs``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq.timeouts import JobTimeoutException

from core.errors import (
    JobCanceled,
    JobError,
    OutOfMemory,
    RunTimeout,
    SpaSemSRError,
    StorageUnavailable,
    UpscaleFailed,
)
from core.jobs import ImageInfo, JobErrorInfo, JobPayload, JobStatus, utcnow
from core.recovery import expire_if_stale, storage_deadline_error, storage_wait_seconds
from core.redis_conn import wait_for_redis
from model.upscalers.base import UpscaleOptions
from worker import devices, imaging
from worker.metrics import current_metrics
from worker.runtime import WorkerRuntime, current_runtime
from worker.webhooks import PredictionEvents

logger = logging.getLogger(__name__)


class JobFailedRecorded(Exception):
    """The job failed and its record says why; raised so that RQ records the failure too
    (its failed-job registry and ``failure_ttl``), rather than a job that finished."""


def run_job(payload: dict[str, Any]) -> dict[str, Any]:
    job = JobPayload.model_validate(payload)
    runtime = current_runtime()
    outcome = JobRunner(runtime, job).run()
    if outcome["status"] == JobStatus.FAILED.value:
        error = runtime.jobs.get(job.job_id).error
        raise JobFailedRecorded(f"{error.type}: {error.detail}" if error else "failed")
    return outcome


T = TypeVar("T")


class WorkerShuttingDown(Exception):
    """Raised at a step boundary once the shutdown grace period is over."""


def with_retries(
    operation: Callable[[], T], *, attempts: int = 5, first_wait_seconds: float = 0.5
) -> T:
    """Storage hiccups are retried with exponential backoff; a longer outage is left to the
    caller (``JobRunner`` holds the job back off the worker until storage returns)."""
    for attempt in range(attempts):
        try:
            return operation()
        except StorageUnavailable:
            if attempt == attempts - 1:
                raise
            wait = first_wait_seconds * 2**attempt
            logger.warning("storage unavailable; retrying in %.1f s", wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


class JobRunner:
    def __init__(self, runtime: WorkerRuntime, job: JobPayload) -> None:
        self.runtime = runtime
        self.job = job
        # A payload from before models were named was queued for the default upscaler.
        self.model = job.parameters.model or next(iter(runtime.upscalers))
        self.timings: dict[str, float] = {}
        self.events: PredictionEvents | None = None
        """A prediction's intermediate webhooks, once the job has started."""

    def run(self) -> dict[str, Any]:
        runtime = self.runtime
        jobs = runtime.jobs
        record = expire_if_stale(
            jobs.get(self.job.job_id),
            jobs=jobs,
            queue=runtime.queue,
            storage=runtime.storage,
            ttl_seconds=runtime.settings.worker.queue_ttl_seconds,
        )
        started_at = utcnow()
        # Marked held before it is marked processing: Redis lost between the two writes must not
        # leave a processing job that no hand-back or sweep knows of (a mark without the
        # transition is dropped by either, since the job is not processing).
        if runtime.recovery is not None:
            runtime.recovery.mark_running(self.job.job_id, runtime.name)
        if not jobs.transition(
            self.job.job_id,
            from_statuses=[JobStatus.QUEUED],
            to=JobStatus.PROCESSING,
            started_at=started_at,
            worker=runtime.name,
            attempts=record.attempts + 1,
            progress={"stage": "starting", "step": 0, "total": 0},
            model_trained=self._model_trained(),
        ):
            logger.info("job %s is %s: not started", self.job.job_id, record.status.value)
            if runtime.recovery is not None:
                runtime.recovery.mark_done(self.job.job_id)
            return {"status": "skipped"}
        self.timings["queue_wait"] = (started_at - record.created_at).total_seconds()
        current_metrics().observe_queue_wait(
            record.priority.value, self.model, self.timings["queue_wait"]
        )
        self.events = PredictionEvents(runtime, record)
        began = time.perf_counter()
        with runtime.busy():
            try:
                self.events.started()
                output = self._process_within_memory()
            except JobCanceled as canceled:  # its detail says at which stage
                return self._finish(JobStatus.CANCELED, began, error=canceled)
            except WorkerShuttingDown:
                return self._hand_back("the worker is shutting down", count_attempt=False)
            except StorageUnavailable as exc:
                # An outage is no fault of the job: it waits off the worker (not failed).
                return self._hold_for_storage(exc, began)
            except JobTimeoutException:
                limit = runtime.settings.worker.job_timeout_seconds
                error = RunTimeout(f"The job ran longer than its {limit} s limit.")
                return self._finish(JobStatus.FAILED, began, error=error)
            except JobError as exc:
                return self._finish(JobStatus.FAILED, began, error=exc)
            except SpaSemSRError as exc:
                return self._finish(JobStatus.FAILED, began, error=UpscaleFailed(exc.detail))
            except (RedisConnectionError, RedisTimeoutError) as exc:
                return self._hand_back_after_redis_outage(exc)
            except Exception as exc:
                if devices.is_fatal_device_error(exc):
                    # The device is unusable: give the job back, and let the supervisor
                    # start a fresh worker process.
                    logger.critical("fatal device error in job %s: %s", self.job.job_id, exc)
                    self._hand_back("its worker hit a fatal device error", count_attempt=True)
                    raise SystemExit(70) from exc
                logger.exception("job %s failed", self.job.job_id)
                return self._finish(
                    JobStatus.FAILED, began, error=UpscaleFailed("The upscaler failed.")
                )
        return self._finish(JobStatus.SUCCEEDED, began, output=output)

    def _process_within_memory(self) -> ImageInfo:
        """Out of device memory: retry with smaller diffusion tiles before giving up."""
        tile_size = self.job.parameters.tile_size
        while True:
            try:
                return self._process(tile_size)
            except Exception as exc:
                if not devices.is_out_of_memory(exc):
                    raise
                devices.release_cached_memory()
                if tile_size // 2 < devices.MIN_TILE_SIZE:
                    raise OutOfMemory(
                        "The device ran out of memory even with the smallest tiles."
                    ) from exc
                tile_size //= 2
                logger.warning("job %s out of memory; retrying with %d px tiles",
                               self.job.job_id, tile_size)  # fmt: skip

    def _model_trained(self) -> bool | None:
        upscaler = self.runtime.upscalers.get(self.model)
        return None if upscaler is None else upscaler.card.trained

    def _hand_back(
        self,
        reason: str,
        *,
        count_attempt: bool,
        delay_seconds: float | None = None,
        storage_wait: bool = False,
    ) -> dict[str, Any]:
        recovery = self.runtime.recovery
        if recovery is not None:
            recovery.requeue(self.job.job_id, self.runtime.name, reason=reason,
                             count_attempt=count_attempt, delay_seconds=delay_seconds,
                             storage_wait=storage_wait)  # fmt: skip
        return {"status": "requeued"}

    def _hand_back_after_redis_outage(self, exc: Exception) -> dict[str, Any]:
        """Redis went away mid-job (its progress or cancel check failed): wait for it, then
        queue the job again, uncounted; nothing about the job itself went wrong. A stop
        requested meanwhile leaves it to the recovery sweep of the workers that remain."""
        logger.error("job %s: lost Redis (%s); waiting for it", self.job.job_id, exc)
        if self.runtime.connection is None:
            raise exc
        wait_for_redis(self.runtime.connection, should_stop=self.runtime.stopping)
        return self._hand_back("its worker lost its connection to Redis", count_attempt=False)

    def _hold_for_storage(self, exc: StorageUnavailable, began: float) -> dict[str, Any]:
        """Storage is still down after the in-process retries: the job goes back in line after
        a growing wait, uncounted, until storage returns or its own deadline passes."""
        logger.warning("job %s: %s", self.job.job_id, exc.detail)
        worker = self.runtime.settings.worker
        if self.runtime.recovery is None:  # nothing to hand it back to (unit tests)
            error = StorageUnavailable("Object storage was unavailable.")
            return self._finish(JobStatus.FAILED, began, error=error)
        record = self.runtime.jobs.get(self.job.job_id)
        remaining = record.created_at.timestamp() + worker.queue_ttl_seconds - time.time()
        if remaining <= 0:
            error = storage_deadline_error(worker.queue_ttl_seconds, record.storage_waits)
            return self._finish(JobStatus.FAILED, began, error=error)
        wait = storage_wait_seconds(
            record.storage_waits,
            first_seconds=worker.retry_backoff_seconds,
            max_seconds=worker.storage_wait_max_seconds,
        )
        # Never past the deadline: the job is then picked up at once and ends with the
        # storage error (``expire_if_stale``) instead of idling in the delay set.
        return self._hand_back(
            "object storage is unavailable",
            count_attempt=False,
            delay_seconds=min(wait, remaining),
            storage_wait=True,
        )

    def _storage_call(self, operation: Callable[[], T]) -> T:
        worker = self.runtime.settings.worker
        return with_retries(
            operation,
            attempts=worker.storage_retry_attempts,
            first_wait_seconds=worker.storage_retry_first_wait_seconds,
        )

    def _process(self, tile_size: int) -> ImageInfo:
        storage = self.runtime.storage
        parameters = self.job.parameters
        with self._timed("read"):
            decoded = imaging.decode(self._storage_call(lambda: storage.get(self.job.input_key)))
            padded, original_size = imaging.pad_to_minimum(decoded.rgb)
        upscaler = self.runtime.upscaler_for(self.model)
        result = upscaler.upscale(padded, self._options(tile_size), on_progress=self._on_progress)
        current_metrics().observe_inference(self.model, result.timings)
        for stage, seconds in result.timings.items():
            self.timings["upscale" if stage == "total" else stage] = float(seconds)
        if result.details:
            self.runtime.jobs.update(self.job.job_id, details=dict(result.details))
        self._on_progress("write", 0, 1)
        with self._timed("write"):
            image = imaging.finish(
                result.image,
                decoded,
                original_size=original_size,
                scale=parameters.scale,
                output_format=parameters.output_format,
            )
            data = imaging.encode(image, parameters.output_format)
            # Encoding a large result takes seconds: a second Ctrl-C or a cancel that came
            # meanwhile is honoured before the result is stored, not after.
            self._stop_if_asked("write")
            media_type = parameters.output_format.media_type
            self._storage_call(
                lambda: storage.put(self.job.output_key, data, content_type=media_type)
            )
        return ImageInfo(
            width=image.width, height=image.height, format=parameters.output_format, bytes=len(data)
        )

    def _options(self, tile_size: int) -> UpscaleOptions:
        p = self.job.parameters
        return UpscaleOptions(
            scale=p.scale,
            steps=p.steps,
            guidance_scale=p.guidance_scale,
            seed=p.seed,
            color_fix=p.color_fix,
            scheduler=p.scheduler,
            tile_size=tile_size,
            tags_hint=p.tags,
            caption_hint=p.caption,
        )

    def _on_progress(self, stage: str, step: int, total: int) -> None:
        self.runtime.jobs.update(
            self.job.job_id, progress={"stage": stage, "step": step, "total": total}
        )
        self._stop_if_asked(stage)
        if self.events is not None:
            self.events.progressed()

    def _stop_if_asked(self, stage: str) -> None:
        """Raise if the client canceled the job or the worker's stop is due."""
        if self.runtime.jobs.cancel_requested(self.job.job_id):
            raise JobCanceled(f"Canceled during {stage}.")
        if self.runtime.shutdown_due():
            raise WorkerShuttingDown

    def _finish(
        self,
        status: JobStatus,
        began: float,
        *,
        output: ImageInfo | None = None,
        error: SpaSemSRError | None = None,
    ) -> dict[str, Any]:
        if self.events is not None:
            self.events.flush()  # queued before the completion, which comes after it
        self.timings["total"] = time.perf_counter() - began
        current_metrics().count_job(status, self.model)
        fields: dict[str, Any] = {
            "finished_at": utcnow(),
            "timings": self.timings,
            "output": output,
            "progress": {"stage": status.value, "step": 0, "total": 0},
        }
        if error is not None:
            fields["error"] = JobErrorInfo(
                type=error.type_name(), title=error.title, detail=error.detail
            )
        self.runtime.jobs.transition(
            self.job.job_id,
            from_statuses=[JobStatus.PROCESSING],
            to=status,
            held_by=self.runtime.name,
            **fields,
        )
        if self.runtime.recovery is not None:
            self.runtime.recovery.mark_done(self.job.job_id)
        if status is not JobStatus.SUCCEEDED:
            self._drop(self.job.output_key)
        self._drop(self.job.input_key)
        self._announce_by_webhook()
        logger.info("job %s %s in %.3f s", self.job.job_id, status.value, self.timings["total"])
        return {"status": status.value}

    def _announce_by_webhook(self) -> None:
        queue = self.runtime.queue
        if queue is not None and self.runtime.jobs.get(self.job.job_id).wants_webhook("completed"):
            intervals = self.runtime.settings.webhooks.retry_intervals_seconds
            queue.enqueue_webhook(self.job.job_id, retry_intervals=intervals)

    def _drop(self, key: str) -> None:
        try:
            self.runtime.storage.delete(key)
        except SpaSemSRError:
            logger.warning("could not delete %s from storage", key)

    def _timed(self, stage: str) -> _Timer:
        return _Timer(self.timings, stage)


class _Timer:
    def __init__(self, timings: dict[str, float], stage: str) -> None:
        self.timings = timings
        self.stage = stage

    def __enter__(self) -> None:
        self.began = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.stage] = time.perf_counter() - self.began
