"""Typed results of the v1 HTTP contract, as the client sees them.

These mirror ``app.schemas.JobPublic`` and ``ModelPublic`` without importing the service, so
that another service can use the client with nothing but ``httpx`` and ``pydantic``. Unknown
fields are kept (``extra="allow"``): a newer server never breaks an older client.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class JobStatus(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


Priority = Literal["high", "default", "low"]
ImageFormat = Literal["png", "jpeg", "webp"]
ColorFix = Literal["none", "adain", "wavelet"]
SchedulerName = Literal["ddpm", "ddim", "dpmsolver++", "unipc"]


class Progress(_Model):
    stage: str = "queued"
    step: int = 0
    total: int = 0

    @property
    def fraction(self) -> float:
        """Share of the current stage done, in [0, 1] (0 when the stage has no steps)."""
        return min(1.0, self.step / self.total) if self.total > 0 else 0.0


class ImageInfo(_Model):
    width: int
    height: int
    format: str
    bytes: int


class JobError(_Model):
    type: str
    title: str
    detail: str


class JobLinks(_Model):
    self: str
    result: str


class Job(_Model):
    """A job as ``GET /v1/jobs/{id}`` reports it."""

    id: str
    status: JobStatus
    priority: str
    queue_position: int | None = None
    progress: Progress = Progress()
    parameters: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    input: ImageInfo
    output: ImageInfo | None = None
    error: JobError | None = None
    grounding: dict[str, Any] | None = None
    links: JobLinks

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal


class ModelDescription(_Model):
    """What the warm workers serve, as ``GET /v1/model`` reports it."""

    name: str
    version: str
    configuration: str
    weights: str
    trained: bool
    device: str
    dtype: str
    description: str = ""
    workers: int = 0
    warnings: list[str] = Field(default_factory=list)


class Health(_Model):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


class Problem(_Model):
    """An RFC 9457 problem document (``application/problem+json``)."""

    type: str = "about:blank"
    title: str = ""
    status: int | None = None
    detail: str = ""
    instance: str | None = None
