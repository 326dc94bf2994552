"""The RQ task that runs one job on this process's warm upscaler.

The API enqueues ``worker.tasks.run_job`` by name with the JSON payload of ``core.jobs``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from core.errors import JobCanceled, JobError, SpaSemSRError, UpscaleFailed
from core.jobs import ImageInfo, JobErrorInfo, JobPayload, JobStatus, utcnow
from model.upscaler import UpscaleOptions
from worker import imaging
from worker.metrics import current_metrics
from worker.runtime import WorkerRuntime, current_runtime

logger = logging.getLogger(__name__)


def run_job(payload: dict[str, Any]) -> dict[str, Any]:
    job = JobPayload.model_validate(payload)
    runtime = current_runtime()
    return JobRunner(runtime, job).run()


class JobRunner:
    def __init__(self, runtime: WorkerRuntime, job: JobPayload) -> None:
        self.runtime = runtime
        self.job = job
        self.timings: dict[str, float] = {}

    def run(self) -> dict[str, Any]:
        jobs = self.runtime.jobs
        started_at = utcnow()
        if not jobs.transition(
            self.job.job_id,
            from_statuses=[JobStatus.QUEUED],
            to=JobStatus.PROCESSING,
            started_at=started_at,
            worker=self.runtime.name,
            progress={"stage": "starting", "step": 0, "total": 0},
        ):
            logger.info("job %s was canceled before it started", self.job.job_id)
            return {"status": "skipped"}
        record = jobs.get(self.job.job_id)
        self.timings["queue_wait"] = (started_at - record.created_at).total_seconds()
        current_metrics().observe_queue_wait(record.priority.value, self.timings["queue_wait"])
        began = time.perf_counter()
        with self.runtime.busy():
            try:
                output = self._process()
            except JobCanceled:
                return self._finish(JobStatus.CANCELED, began, error=JobCanceled())
            except JobError as exc:
                return self._finish(JobStatus.FAILED, began, error=exc)
            except SpaSemSRError as exc:
                return self._finish(JobStatus.FAILED, began, error=UpscaleFailed(exc.detail))
            except Exception:
                logger.exception("job %s failed", self.job.job_id)
                return self._finish(
                    JobStatus.FAILED, began, error=UpscaleFailed("The upscaler failed.")
                )
        return self._finish(JobStatus.SUCCEEDED, began, output=output)

    def _process(self) -> ImageInfo:
        storage = self.runtime.storage
        parameters = self.job.parameters
        with self._timed("read"):
            decoded = imaging.decode(storage.get(self.job.input_key))
            padded, original_size = imaging.pad_to_minimum(decoded.rgb)
        result = self.runtime.upscaler.upscale(
            padded, self._options(), on_progress=self._on_progress
        )
        current_metrics().observe_inference(result.timings)
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
            storage.put(self.job.output_key, data, content_type=parameters.output_format.media_type)
        return ImageInfo(
            width=image.width, height=image.height, format=parameters.output_format, bytes=len(data)
        )

    def _options(self) -> UpscaleOptions:
        p = self.job.parameters
        return UpscaleOptions(
            scale=p.scale,
            steps=p.steps,
            guidance_scale=p.guidance_scale,
            seed=p.seed,
            color_fix=p.color_fix,
            scheduler=p.scheduler,
            tile_size=p.tile_size,
            tags_hint=p.tags,
            caption_hint=p.caption,
        )

    def _on_progress(self, stage: str, step: int, total: int) -> None:
        jobs = self.runtime.jobs
        jobs.update(self.job.job_id, progress={"stage": stage, "step": step, "total": total})
        if jobs.cancel_requested(self.job.job_id):
            raise JobCanceled(f"Canceled during {stage}.")

    def _finish(
        self,
        status: JobStatus,
        began: float,
        *,
        output: ImageInfo | None = None,
        error: SpaSemSRError | None = None,
    ) -> dict[str, Any]:
        self.timings["total"] = time.perf_counter() - began
        current_metrics().count_job(status)
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
            self.job.job_id, from_statuses=[JobStatus.PROCESSING], to=status, **fields
        )
        if status is not JobStatus.SUCCEEDED:
            self._drop(self.job.output_key)
        self._drop(self.job.input_key)
        logger.info("job %s %s in %.3f s", self.job.job_id, status.value, self.timings["total"])
        return {"status": status.value}

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
