"""One settings object for the whole service (pydantic-settings).

Every value can be set from the environment with the ``SPASEMSR_`` prefix and ``__`` between
a section and its field, e.g. ``SPASEMSR_REDIS__URL=redis://redis:6379/0`` or
``SPASEMSR_STORAGE__BACKEND=s3``. There is no module-level instance: processes build one with
``Settings()`` at start-up and pass it down.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.models import ModelName

MiB = 1024 * 1024


class ApiKey(BaseModel):
    """A client's key, stored as the SHA-256 of the key (never the key itself)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    admin: bool = False
    """An admin key may read and cancel every job; other keys only their own."""


class ApiSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    public_url: str | None = None
    """Base URL clients use to reach the API (for ``Location`` headers); ``None`` = from request."""
    max_upload_bytes: int = Field(default=20 * MiB, ge=1)
    upload_idle_timeout_seconds: float = Field(default=30.0, gt=0)
    """A client silent this long in the middle of an upload gets 408."""
    max_prefer_wait_seconds: float = Field(default=60.0, ge=0)
    """The longest a request with ``Prefer: wait`` is held open for its job to end."""
    body_deadline_seconds: float = Field(default=120.0, gt=0)
    """A request body not complete this long after its headers gets 408, however steadily it
    trickles in."""
    header_deadline_seconds: float = Field(default=30.0, gt=0)
    """A connection that has not sent a complete request head this long after it opened (or
    after its previous response) is closed (``app.server``)."""
    max_input_pixels: int = Field(default=2048 * 2048, ge=1)
    """Input pixel cap, checked from the image header before anything is decoded."""
    max_output_pixels: int = Field(default=8192 * 8192, ge=1)
    max_queue_depth: int = Field(default=1000, ge=1)
    """Beyond this many queued jobs of a model (all its priorities), new uploads for that model
    get 429 with ``Retry-After``."""
    max_queue_age_seconds: float = Field(default=900.0, gt=0)
    """When a model's oldest queued job has waited longer than this, its new uploads get 429."""
    retry_after_seconds: int = Field(default=30, ge=1)
    auth_required: bool = False
    """Production sets this: every request but health checks needs a key from ``keys``."""
    keys: tuple[ApiKey, ...] = ()
    rate_limit_per_minute: float = Field(default=600.0, ge=0)
    """Job submissions per client (API key, or address without one); 0 turns it off."""
    rate_limit_burst: int = Field(default=100, ge=1)
    auth_failures_per_minute: int = Field(default=10, ge=0)
    """Failed API-key attempts per client address in a minute; after that, requests from the
    address that present a key get 429 until the minute is over. 0 turns it off."""
    idempotency_ttl_seconds: int = Field(default=24 * 3600, ge=60)
    result_delivery: Literal["stream", "redirect"] = "stream"
    """``redirect`` sends clients to a presigned URL when the storage backend offers one."""
    file_ttl_seconds: int = Field(default=24 * 3600, ge=60)
    """How long a file uploaded to ``POST /v1/files`` (Replicate's clients) can be used."""


class RedisSettings(BaseModel):
    url: str | None = None
    """``None``: the project starts its own ``redis-server`` (``spasemsr serve``)."""
    key_prefix: str = "spasemsr"
    socket_timeout_seconds: float = Field(default=5.0, gt=0)


class StorageSettings(BaseModel):
    backend: Literal["local", "s3"] = "local"
    local_root: Path | None = None
    """Root folder of the local backend; ``None`` = ``<var_dir>/storage``."""
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = None
    """Endpoint clients can reach, for signing presigned GET URLs (default: the endpoint)."""
    s3_bucket: str = "spasemsr"
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_addressing_style: Literal["path", "virtual", "auto"] = "path"
    s3_create_bucket: bool = False
    presign_expiry_seconds: int = Field(default=900, ge=1, le=7 * 24 * 3600)


class WorkerSettings(BaseModel):
    name: str | None = None
    models: tuple[ModelName, ...] = ()
    """Models this worker holds warm and serves the queues of; empty = every model."""
    queues: tuple[str, ...] = ("high", "default", "low")
    """Priorities served by this worker, highest first."""
    job_timeout_seconds: int = Field(default=1800, ge=1)
    """Run timeout: a job running longer ends ``failed`` with ``run-timeout``."""
    queue_ttl_seconds: float = Field(default=3600.0, gt=0)
    """Queue time-to-live: a job not started by then ends ``failed`` with ``queue-timeout``."""
    max_attempts: int = Field(default=3, ge=1)
    """Workers a job may take down with it before it fails with ``worker-lost``."""
    retry_backoff_seconds: float = Field(default=2.0, ge=0)
    """First wait before a handed-back job is queued again; doubles with each hand-back."""
    storage_retry_attempts: int = Field(default=5, ge=1)
    """Tries of one storage read or write inside the job before it waits off the worker."""
    storage_retry_first_wait_seconds: float = Field(default=0.5, ge=0)
    """Wait after the first failed try; doubles with each further try."""
    storage_wait_max_seconds: float = Field(default=60.0, gt=0)
    """Longest wait of a job held back while storage is unavailable (the waits start at
    ``retry_backoff_seconds`` and double); it is held until storage returns or its queue
    time-to-live, counted from its acceptance, is over."""
    orphan_grace_seconds: float = Field(default=30.0, ge=0)
    """A queued job with no queue entry for this long (its worker stopped between taking it and
    starting it) is queued again by the recovery sweep."""
    shutdown_grace_seconds: float = Field(default=60.0, ge=0)
    """After SIGTERM the current job may finish within this; then it is queued again."""
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    record_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    """How long job records and results are kept after they finish."""
    metrics_host: str = "127.0.0.1"
    """Address of the worker's own ``/metrics`` endpoint (containers set ``0.0.0.0``)."""
    metrics_port: int | None = Field(default=9100, ge=0, le=65535)
    """One scrape port per worker process; ``None`` turns the endpoint off."""
    metrics_port_span: int = Field(default=16, ge=1, le=1024)
    """Several workers on one host take the first free port of ``metrics_port`` + 0..span-1."""


class WebhookSettings(BaseModel):
    secret: SecretStr | None = None
    """HMAC key for signatures; webhooks are refused (422) while it is unset."""
    allow_networks: tuple[str, ...] = ()
    """CIDRs that may receive webhooks although private (e.g. ``10.0.0.0/8`` inside a VPC)."""

    @field_validator("allow_networks")
    @classmethod
    def _valid_networks(cls, networks: tuple[str, ...]) -> tuple[str, ...]:
        # A mistyped network must stop the process at start-up, not fail every webhook later.
        for network in networks:
            ipaddress.ip_network(network, strict=False)
        return networks

    timeout_seconds: float = Field(default=5.0, gt=0)
    retry_intervals_seconds: tuple[int, ...] = (5, 30, 120, 600, 1800)
    """Waits before each retry; their count is the number of retries."""


class ModelSettings(BaseModel):
    default: ModelName | None = None
    """The model of requests that name none; ``None``: ``spasemsr`` when ``path`` is set (a
    trained pipeline), else ``realesrgan-x4plus`` (trained, published weights)."""
    path: Path | None = None
    """SpaSemSR pipeline folder; ``None`` = the tiny, untrained demo pipeline built under
    ``var/``."""
    weights: dict[ModelName, Path] = Field(default_factory=dict)
    """Your own weights for a Real-ESRGAN family model: a published ``.pth`` / ``.safetensors``
    or a converted folder, e.g. ``{"realesrgan-x4plus": "/models/RealESRGAN_x4plus.pth"}``."""
    grounder_path: Path | None = None
    """Grounding models folder; ``None`` = the tiny demo grounder built once under ``var/``."""
    device: str = "auto"
    """``auto`` = CUDA when available, else CPU."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    optimise: Literal["auto", "off"] = "auto"
    """``auto``: on CUDA the optimised speed settings (bf16, compile, CUDA graphs; compiled at
    warm-up); ``off``: plain eager in ``dtype``."""
    cpu_threads: int | None = Field(default=None, ge=1)
    """Torch threads when running on the CPU; ``None`` = half the cores, at most 4."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SPASEMSR_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    var_dir: Path = Path("var")
    api: ApiSettings = ApiSettings()
    redis: RedisSettings = RedisSettings()
    storage: StorageSettings = StorageSettings()
    worker: WorkerSettings = WorkerSettings()
    webhooks: WebhookSettings = WebhookSettings()
    model: ModelSettings = ModelSettings()

    def storage_root(self) -> Path:
        return self.storage.local_root or self.var_dir / "storage"
