"""What the sync and async clients share: request shaping, retry policy, answer decoding."""

from __future__ import annotations

import mimetypes
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, TypedDict

import httpx

from spasemsr_client.errors import JobCanceled, JobFailed, WaitTimeout, error_from_response
from spasemsr_client.models import (
    ColorFix,
    ImageFormat,
    Job,
    JobStatus,
    Priority,
    SchedulerName,
)

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 503})

ImageSource = str | os.PathLike[str] | bytes | IO[bytes]
"""A path, the encoded bytes of an image, or a binary file object."""

ProgressHandler = Callable[[Job], object]
"""Called with the job each time its status, queue position or progress changes."""

EVENTS_UNSUPPORTED = frozenset({404, 405, 406})
"""Answers of ``GET /v1/jobs/{id}/events`` after which the clients poll ``GET /v1/jobs/{id}``
instead (a service without the route; 404 also means an unknown job, which the poll then
reports as ``JobNotFound``)."""
EVENTS_READ_SECONDS = 45.0
"""The least read timeout of an event stream: a quiet stream carries a comment every 15 s."""


class JobOptions(TypedDict, total=False):
    """Parameters of ``POST /v1/jobs``; a missing key takes the service's default."""

    scale: int
    steps: int
    guidance_scale: float
    seed: int
    color_fix: ColorFix
    scheduler: SchedulerName
    tile_size: int
    output_format: ImageFormat
    priority: Priority
    tags: Sequence[str]
    caption: str
    webhook: str
    """URL the service calls when the job ends (when the service has webhooks enabled)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How 429 and 503 answers are retried.

    ``retries`` extra attempts; each waits the answer's ``Retry-After`` when it gives one, else
    ``backoff`` seconds doubled per attempt. A wait longer than ``max_wait`` is not slept: the
    error is raised at once so that the caller can decide.
    """

    retries: int = 3
    backoff: float = 0.5
    max_wait: float = 60.0

    def delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or ``None`` to give up."""
        if attempt >= self.retries:
            return None
        wait = retry_after if retry_after is not None else self.backoff * 2**attempt
        return wait if wait <= self.max_wait else None


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds: either delay-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def form_fields(options: JobOptions, *, model: str | None = None) -> dict[str, str]:
    """The form fields of ``POST /v1/jobs``; ``model=None`` leaves the choice to the service."""
    fields = {
        key: str(value) for key, value in options.items() if key != "tags" and value is not None
    }
    tags = options.get("tags")
    if tags is not None:
        fields["tags"] = tags if isinstance(tags, str) else ",".join(tags)
    if "webhook" in fields:  # the option's name in Python; the form field is webhook_url
        fields["webhook_url"] = fields.pop("webhook")
    if model is not None:
        fields["model"] = str(model)
    return fields


def image_part(source: ImageSource, filename: str | None) -> tuple[str, bytes, str]:
    """``(filename, bytes, media type)`` of the ``image`` part; read once so retries resend it."""
    if isinstance(source, bytes):
        data, name = source, filename or "image"
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        data, name = path.read_bytes(), filename or path.name
    else:
        data = source.read()
        name = filename or Path(str(getattr(source, "name", "image"))).name
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return name, data, media_type


def retry_after_of(response: httpx.Response) -> float | None:
    return parse_retry_after(response.headers.get("retry-after"))


def should_retry(response: httpx.Response) -> bool:
    return response.status_code in RETRY_STATUSES


def raise_for_problem(response: httpx.Response) -> None:
    if response.status_code >= 400:
        raise error_from_response(response, retry_after=retry_after_of(response))


def decode_job(response: httpx.Response) -> Job:
    raise_for_problem(response)
    return Job.model_validate(response.json())


def check_outcome(job: Job) -> Job:
    """The job when it succeeded; its failure as a typed error otherwise."""
    if job.status is JobStatus.FAILED:
        raise JobFailed(job)
    if job.status is JobStatus.CANCELED:
        raise JobCanceled(job)
    return job


def job_signature(job: Job) -> tuple[object, ...]:
    """What a progress handler cares about: a change in any of these is reported."""
    progress = job.progress
    return (job.status, job.queue_position, progress.stage, progress.step, progress.total)


def submit_headers(idempotency_key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": idempotency_key} if idempotency_key else {}


def build_headers(api_key: str | None, extra: dict[str, str] | None) -> dict[str, str]:
    headers = {"User-Agent": "spasemsr-client/0.1", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    headers.update(extra or {})
    return headers


# --- Server-Sent Events (GET /v1/jobs/{id}/events) ----------------------------------------


@dataclass(frozen=True)
class ServerSentEvent:
    event: str
    data: str


class EventParser:
    """Events from the lines of a ``text/event-stream`` (WHATWG HTML, 9.2.6): ``event:`` and
    ``data:`` fields, ``:`` comments (keep-alives), a blank line ends each event. ``id`` and
    ``retry`` are ignored: the service sends neither."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> ServerSentEvent | None:
        """The event that ``line`` completes, if any."""
        if line == "":  # an event without data lines is dropped, as a browser drops it
            event = ServerSentEvent(self._event or "message", "\n".join(self._data))
            had_data = bool(self._data)
            self._event, self._data = "", []
            return event if had_data else None
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        return None


def job_of(event: ServerSentEvent | None) -> Job | None:
    """The job a ``job`` event carries (the service sends no other kind today)."""
    if event is None or event.event != "job":
        return None
    return Job.model_validate_json(event.data)


class EventsUnsupported(Exception):
    """The service has no event stream for jobs: follow the job by polling instead."""


def open_events_check(response: httpx.Response) -> None:
    """Raise for an event-stream answer that carries no events (its body already read)."""
    if response.status_code in EVENTS_UNSUPPORTED:
        raise EventsUnsupported(response.status_code)
    raise_for_problem(response)


EVENTS_HEADERS = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def check_deadline(job_id: str, deadline: float | None, timeout: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise WaitTimeout(job_id, timeout or 0.0)


def stream_timeout(base: httpx.Timeout, deadline: float | None) -> httpx.Timeout:
    """The client's timeouts, with a read timeout that outlasts the stream's keep-alives but
    not the caller's deadline (a blocked read then ends when the wait should)."""
    read = max(base.read or 0.0, EVENTS_READ_SECONDS)
    if deadline is not None:
        read = min(read, max(deadline - time.monotonic(), 0.05))
    return httpx.Timeout(base.connect, read=read, write=base.write, pool=base.pool)
