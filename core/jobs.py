"""The job contract: request parameters with their bounds, job states, and the queue payload.

Only ids, storage keys and these JSON parameters cross Redis (never image bytes, never pickle).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.models import ModelName


class JobStatus(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})


class Priority(StrEnum):
    HIGH = "high"
    DEFAULT = "default"
    LOW = "low"


class ImageFormat(StrEnum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"

    @property
    def media_type(self) -> str:
        return f"image/{self.value}"

    @property
    def extension(self) -> str:
        return "jpg" if self is ImageFormat.JPEG else self.value


# The job contract's types, bounds and defaults are written here once. The HTTP form
# (app.schemas), the CLI options, the web form (rendered from the form's schema) take them from
# here; the client's and the model's own copies are checked against them by tests.
ScaleFactor = Literal[2, 4]
ColorFix = Literal["none", "adain", "wavelet"]
SchedulerName = Literal["ddpm", "ddim", "dpmsolver++", "unipc"]
Steps = Annotated[int, Field(ge=1, le=100, description="Denoising steps.")]
GuidanceScale = Annotated[float, Field(ge=0.0, le=20.0, description="Classifier-free guidance.")]
Seed = Annotated[int | None, Field(ge=0, le=2**32 - 1, description="Random seed; none: random.")]
TileSize = Annotated[
    int,
    Field(ge=256, le=1024, multiple_of=64, description="Diffusion tile side in output pixels."),
]

WebhookEvent = Literal["start", "output", "logs", "completed"]
"""Replicate's webhook events: the job began, its output or logs changed (progress), it ended."""

SCALES: tuple[int, ...] = get_args(ScaleFactor)
"""Magnifications of the v1 contract (``JobParameters.scale``)."""
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = get_args(WebhookEvent)
COLOR_FIXES: tuple[str, ...] = get_args(ColorFix)
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)
MAX_TAGS = 32
MAX_TAG_CHARS = 64
MAX_CAPTION_CHARS = 500


class JobParameters(BaseModel):
    """What a client may ask of one job; every field has bounds (DESIGN 1.2 step 8, 2.2)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelName | None = None
    """The model to run; ``None`` = the service's default, filled in when the job is accepted.
    The diffusion parameters (steps, guidance, scheduler, colour fix, hints) apply to
    ``spasemsr`` only; the other models ignore them."""
    scale: ScaleFactor = 4
    steps: Steps = 20
    guidance_scale: GuidanceScale = 4.5
    seed: Seed = None
    color_fix: ColorFix = "wavelet"
    scheduler: SchedulerName = "dpmsolver++"
    tile_size: TileSize = 512
    output_format: ImageFormat = ImageFormat.PNG
    tags: Annotated[tuple[str, ...], Field(max_length=MAX_TAGS)] = ()
    """Optional grounding hint: object tags to use."""
    caption: Annotated[str | None, Field(max_length=MAX_CAPTION_CHARS)] = None
    """Optional grounding hint: a caption of the scene."""

    @field_validator("tags")
    @classmethod
    def _clean_tags(cls, tags: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = tuple(tag.strip() for tag in tags if tag.strip())
        for tag in cleaned:
            if len(tag) > MAX_TAG_CHARS:
                raise ValueError(f"tag longer than {MAX_TAG_CHARS} characters")
        return cleaned


@dataclass(frozen=True)
class Bounds:
    """A numeric parameter's limits, as its ``Field`` declares them."""

    minimum: float
    maximum: float
    multiple_of: float | None = None


def parameter_default(name: str) -> Any:
    """The default of ``JobParameters.<name>``."""
    return JobParameters.model_fields[name].default


def parameter_bounds(name: str) -> Bounds:
    """The limits of a numeric ``JobParameters`` field (read from its annotations)."""
    found: dict[str, float] = {}
    for constraint in JobParameters.model_fields[name].metadata:
        for key in ("ge", "le", "multiple_of"):
            if getattr(constraint, key, None) is not None:
                found[key] = getattr(constraint, key)
    return Bounds(found["ge"], found["le"], found.get("multiple_of"))


class ImageInfo(BaseModel):
    width: int
    height: int
    format: ImageFormat
    bytes: int


class JobPayload(BaseModel):
    """The JSON that crosses the queue: ids, storage keys and parameters only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    input_key: str
    output_key: str
    input: ImageInfo
    parameters: JobParameters


class Progress(BaseModel):
    stage: str = "queued"
    step: int = 0
    total: int = 0


class JobErrorInfo(BaseModel):
    type: str
    title: str
    detail: str


class JobRecord(BaseModel):
    """Everything known about a job; stored in Redis, shown (as ``JobPublic``) to clients."""

    id: str
    status: JobStatus
    priority: Priority
    parameters: JobParameters
    input: ImageInfo
    input_key: str
    output_key: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: Progress = Progress()
    timings: dict[str, float] = {}
    output: ImageInfo | None = None
    error: JobErrorInfo | None = None
    worker: str | None = None
    attempts: int = 0
    """How many times a worker started this job (a worker that died counts)."""
    storage_waits: int = 0
    """How many times the job was held back because object storage was unavailable (these
    hand-backs are no attempt; the count sets the next wait)."""
    rq_job_id: str | None = None
    """The queue entry of the current attempt (``None`` = the job id itself)."""
    owner: str | None = None
    """Name of the API key that created the job (``None`` without authentication)."""
    webhook_url: str | None = None
    webhook: dict[str, Any] | None = None
    """Delivery state of the completion webhook: status, attempts, last error."""
    webhook_events: list[WebhookEvent] | None = None
    """A prediction's (Replicate's) webhook events: each one is delivered with the prediction
    object. ``None``: a job of ``POST /v1/jobs``, whose webhook is its completion, with the
    job object."""
    api_url: str | None = None
    """The API's base URL as the client reached it, for the absolute links of a prediction's
    webhooks when ``api.public_url`` is not configured."""
    details: dict[str, Any] = {}
    model_trained: bool | None = None
    """Whether the model's weights are trained, as its workers announce it (``None``: unknown
    until a worker serving the model has been seen)."""

    @property
    def model(self) -> ModelName | None:
        return self.parameters.model

    def wants_webhook(self, *events: WebhookEvent) -> bool:
        """Whether any of ``events`` is to be delivered to the job's webhook."""
        if self.webhook_url is None:
            return False
        wanted = self.webhook_events if self.webhook_events is not None else ["completed"]
        return any(event in wanted for event in events)


def payload_for(record: JobRecord) -> JobPayload:
    return JobPayload(
        job_id=record.id,
        input_key=record.input_key,
        output_key=record.output_key,
        input=record.input,
        parameters=record.parameters,
    )


def new_job_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


def input_key_for(job_id: str) -> str:
    return f"inputs/{job_id}"


def output_key_for(job_id: str, output_format: ImageFormat) -> str:
    return f"results/{job_id}.{output_format.extension}"
