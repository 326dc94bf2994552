"""A job as Replicate's prediction object: what ``GET /v1/predictions/{id}`` answers and what a
prediction's webhooks carry (the API and the workers build it alike, hence here in ``core``).

Status mapping: ``queued`` is Replicate's ``starting``, the other statuses have the same names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from core.jobs import JobRecord, JobStatus
from core.models import ModelName
from core.settings import Settings
from core.storage import ObjectStorage

OWNER = "spasemsr"
_STATUS = {JobStatus.QUEUED: "starting"}


def version_id(model: ModelName) -> str:
    """A stable, Replicate-shaped (64 hex) version id per served model."""
    return hashlib.sha256(f"{OWNER}/{model.value}".encode()).hexdigest()


def prediction_logs(record: JobRecord) -> str:
    """Stage timings, then the current step as a progress bar Replicate's clients parse."""
    lines = [f"{stage}: {seconds:.3f} s" for stage, seconds in record.timings.items()]
    progress = record.progress
    if progress.total > 0:
        share = min(progress.step, progress.total) / progress.total
        bar = "#" * round(share * 10) + " " * (10 - round(share * 10))
        lines.append(f"{round(share * 100)}%|{bar}| {progress.step}/{progress.total} "
                     f"[{progress.stage}]")  # fmt: skip
    elif not record.status.is_terminal:
        lines.append(progress.stage)
    return "\n".join(lines)


def _output(record: JobRecord, base: str, storage: ObjectStorage, settings: Settings) -> str | None:
    if record.status is not JobStatus.SUCCEEDED or record.output is None:
        return None
    if settings.api.result_delivery == "redirect":
        # Replicate's clients do not follow redirects: hand them the presigned URL itself.
        presigned = storage.presigned_url(record.output_key)
        if presigned:
            return presigned
    return f"{base}/v1/jobs/{record.id}/result"


def prediction(
    record: JobRecord,
    note: Mapping[str, Any],
    *,
    base: str,
    storage: ObjectStorage,
    settings: Settings,
) -> dict[str, Any]:
    """The prediction object of ``record``; ``note`` is what the client sent
    (``core.owned.OwnedJobs.note``), ``base`` the API's absolute URL."""
    model = record.model or ModelName.LANCZOS  # always filled in once a job is accepted
    started, finished = record.started_at, record.finished_at
    metrics: dict[str, Any] = {}
    if started is not None and finished is not None:
        metrics["predict_time"] = round((finished - started).total_seconds(), 6)
    error = record.error
    url = f"{base}/v1/predictions/{record.id}"
    return {
        "id": record.id,
        "model": f"{OWNER}/{model.value}",
        "version": note.get("version") or version_id(model),
        "input": note.get("input") or record.parameters.model_dump(mode="json"),
        "output": _output(record, base, storage, settings),
        "error": f"{error.title}: {error.detail}" if error is not None else None,
        "logs": prediction_logs(record),
        "status": _STATUS.get(record.status, record.status.value),
        "data_removed": False,
        "source": "api",
        "created_at": record.created_at.isoformat(),
        "started_at": started.isoformat() if started else None,
        "completed_at": finished.isoformat() if finished else None,
        "metrics": metrics,
        "urls": {"get": url, "cancel": f"{url}/cancel"},
    }
