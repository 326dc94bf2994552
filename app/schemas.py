"""Request and response schemas of the v1 HTTP contract (DESIGN 2.2)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.jobs import (
    MAX_CAPTION_CHARS,
    SCALES,
    ColorFix,
    GuidanceScale,
    ImageFormat,
    ImageInfo,
    JobErrorInfo,
    JobParameters,
    JobStatus,
    Priority,
    Progress,
    SchedulerName,
    Seed,
    Steps,
    TileSize,
    parameter_default,
)
from core.models import ModelName
from core.workers import ModelInfo


class JobCreate(BaseModel):
    """Form fields of ``POST /v1/jobs`` (beside the ``image`` file part)."""

    model: Annotated[
        ModelName | None,
        Field(description="Which model; omitted = the service's default (see GET /v1/models)."),
    ] = None

    # An int checked by a validator rather than Literal[2, 4]: form fields arrive as text,
    # and pydantic does not coerce "4" into an integer literal.
    scale: Annotated[
        int,
        Field(description="Upscaling factor.", json_schema_extra={"enum": list(SCALES)}),
    ] = parameter_default("scale")
    # The types and defaults of the job contract (core.jobs), not copies of them.
    steps: Steps = parameter_default("steps")
    guidance_scale: GuidanceScale = parameter_default("guidance_scale")
    seed: Seed = parameter_default("seed")
    color_fix: ColorFix = parameter_default("color_fix")
    scheduler: SchedulerName = parameter_default("scheduler")
    tile_size: TileSize = parameter_default("tile_size")
    output_format: ImageFormat = parameter_default("output_format")
    priority: Priority = Priority.DEFAULT
    tags: Annotated[
        str | None, Field(max_length=2048, description="Grounding hint: comma-separated tags.")
    ] = None
    caption: Annotated[
        str | None, Field(max_length=MAX_CAPTION_CHARS, description="Grounding hint: a caption.")
    ] = None
    webhook_url: Annotated[
        str | None,
        Field(max_length=2048, description="POSTed (HMAC-signed) when the job ends."),
    ] = None

    @field_validator("scale")
    @classmethod
    def _supported_scale(cls, scale: int) -> int:
        if scale not in SCALES:
            raise ValueError(f"Input should be {' or '.join(map(str, SCALES))}")
        return scale

    def parameters(self, model: ModelName) -> JobParameters:
        """The job's parameters, with the model the request resolved to."""
        tags = tuple(t for t in (self.tags or "").split(",") if t.strip())
        return JobParameters.model_validate(
            {
                **self.model_dump(exclude=set(_NOT_PARAMETERS)),
                "model": model,
                "tags": tags,
            }
        )


class JobCreateJson(JobCreate):
    """``POST /v1/jobs`` as ``application/json``: the form's fields, and the image by
    reference instead of as a file part. Unknown fields are refused, as in the form."""

    model_config = ConfigDict(extra="forbid")

    image: Annotated[
        str,
        Field(
            min_length=1,
            description="PNG, JPEG or WebP: a /v1/files URL or id, a data: URI or an http(s) "
            "URL (fetched under the upload byte cap; internal addresses are refused).",
        ),
    ]


_NOT_PARAMETERS = frozenset({"priority", "tags", "webhook_url", "model", "image"})
"""Request fields that are not job parameters (the job record keeps them elsewhere)."""


class JobLinks(BaseModel):
    self: str
    result: str


class JobPublic(BaseModel):
    id: str
    status: JobStatus
    model: ModelName | None = Field(default=None, description="The model that runs this job.")
    model_trained: bool | None = Field(
        default=None,
        description="Whether that model's weights are trained (null: no worker seen yet).",
    )
    warnings: list[str] = Field(
        default_factory=list, description="Things to know about the result, e.g. untrained weights."
    )
    priority: Priority
    queue_position: int | None = Field(
        default=None, description="Jobs ahead of this one (0 = next); null unless queued."
    )
    progress: Progress
    parameters: JobParameters
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    timings: dict[str, float] = Field(description="Seconds per stage.")
    input: ImageInfo
    output: ImageInfo | None
    error: JobErrorInfo | None
    grounding: dict[str, Any] | None = Field(
        default=None, description="Tags, boxes and caption the job used, with grounding timings."
    )
    links: JobLinks


class ModelPublic(ModelInfo):
    workers: int = Field(description="Warm workers serving this model.")
    default: bool = Field(default=False, description="Requests that name no model get this one.")
    devices: list[str] = Field(default_factory=list, description="Devices of its warm workers.")
    warnings: list[str] = Field(default_factory=list)


class ModelList(BaseModel):
    default: ModelName
    models: list[ModelPublic] = Field(description="Every model a warm worker serves.")


class HealthPublic(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


class JobList(BaseModel):
    """One page of the caller's jobs, newest first."""

    jobs: list[JobPublic]
    next: str | None = None
    """The next page's URL; ``None`` on the last page."""
