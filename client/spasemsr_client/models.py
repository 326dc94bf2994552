"""Typed results of the v1 HTTP contract, as the client sees them.

These mirror ``app.schemas.JobPublic``, ``ModelPublic`` and ``ModelList`` without importing the
service, so that another service can use the client with nothing but ``httpx`` and ``pydantic``.
Unknown fields are kept (``extra="allow"``) and model names are plain strings (``MODEL_NAMES``
lists the ones this client knows): a newer server never breaks an older client.
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

MODEL_NAMES: tuple[str, ...] = (
    "spasemsr",
    "realesrgan-x4plus",
    "realesrgan-x4plus-anime",
    "realesr-animevideov3",
    "lanczos",
)
"""The models this version of the client knows of; a service may serve fewer (``models()``
says which) and a newer one more, so a job's ``model`` is any string."""


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
    model: str | None = None
    """The model that runs this job (the service's default when the request named none)."""
    model_trained: bool | None = None
    """Whether that model's weights are trained; ``None`` while no worker of it was seen."""
    warnings: list[str] = Field(default_factory=list)
    """Things to know about the result, e.g. that the model's weights are untrained."""
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

    @property
    def untrained(self) -> bool:
        """True when the service says the job's model has untrained weights."""
        return self.model_trained is False


class ModelDescription(_Model):
    """One model the warm workers serve, as ``GET /v1/models`` lists it (``GET /v1/model``:
    the default one)."""

    name: str
    version: str
    configuration: str
    weights: str
    """Where the weights came from, in words."""
    trained: bool
    device: str
    dtype: str
    description: str = ""
    source: str = ""
    licence: str = ""
    scales: list[int] = Field(default_factory=lambda: [2, 4])
    workers: int = 0
    """Warm workers serving this model."""
    default: bool = False
    """Requests that name no model get this one."""
    devices: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)


class ModelList(_Model):
    """``GET /v1/models``: every model a warm worker serves, and the service's default."""

    default: str
    """The model of requests that name none (it may have no warm worker yet)."""
    models: list[ModelDescription] = Field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [model.name for model in self.models]

    def get(self, name: str) -> ModelDescription | None:
        """The served model called ``name``; ``None`` when no warm worker serves it."""
        return next((model for model in self.models if model.name == name), None)


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
