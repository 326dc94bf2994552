"""Typed errors of the service, named for the condition (DESIGN 3.2, httpx style).

    SpaSemSRError
    ├── ClientError                     the request is at fault (4xx)
    │   ├── UploadTooLarge              more bytes than the cap
    │   ├── UploadTimeout               the client stopped sending in the middle of the body
    │   ├── TooManyPixels               more pixels than the cap (read from the header)
    │   ├── UnsupportedImage            not a PNG, JPEG or WebP by its bytes
    │   ├── CorruptImage                a supported format that does not decode (truncated, damaged)
    │   ├── InvalidParameters           a parameter out of its bounds
    │   ├── ModelNotServed              a model no worker of this service serves
    │   ├── JobNotFound                 no such job (or it expired)
    │   ├── JobNotFinished              the result was asked for before the job succeeded
    │   ├── ResultGone                  the job succeeded but its result object is gone
    │   ├── JobAlreadyFinished          cancel asked of a job that already ended
    │   ├── Unauthorized                no API key, or one that is not known
    │   ├── Forbidden                   a known key asking for what is not its own
    │   ├── IdempotencyKeyInUse         the first request with this key is still running
    │   └── IdempotencyKeyMismatch      the key was used before for a different request
    ├── Overloaded                      the queue is full or too old: retry later
    │   └── RateLimited                 this client sent too many jobs: retry later
    ├── DependencyUnavailable           a backing service is down (503)
    │   ├── QueueUnavailable            Redis
    │   └── StorageUnavailable          object storage
    └── JobError                        recorded on a job that did not succeed
        ├── JobCanceled                 the user canceled it
        ├── InputMissing                its input is gone from storage
        ├── QueueTimeout                it waited in the queue longer than its time-to-live
        ├── RunTimeout                  it ran longer than the run timeout
        ├── WorkerLost                  its workers kept dying (bounded retries used up)
        ├── OutOfMemory                 the device ran out of memory even with smaller tiles
        └── UpscaleFailed               the upscaler raised

The mapping to HTTP statuses lives in one place: ``app/errors.py``.
"""

from __future__ import annotations


class SpaSemSRError(Exception):
    """Base of every error the service reports. ``title`` is short and fixed per class."""

    title = "Internal error"

    def __init__(self, detail: str | None = None) -> None:
        self.detail = detail or self.title
        super().__init__(self.detail)

    @classmethod
    def type_name(cls) -> str:
        """A stable, kebab-case name for the error class (used in problem ``type`` URIs)."""
        name = cls.__name__
        return "".join(f"-{c.lower()}" if c.isupper() else c for c in name).lstrip("-")


class ClientError(SpaSemSRError):
    title = "Bad request"


class UploadTooLarge(ClientError):
    title = "Upload too large"


class UploadTimeout(ClientError):
    title = "Upload too slow"


class TooManyPixels(ClientError):
    title = "Image has too many pixels"


class UnsupportedImage(ClientError):
    title = "Unsupported image format"


class CorruptImage(ClientError):
    title = "Image cannot be decoded"


class InvalidParameters(ClientError):
    title = "Invalid parameters"


class ModelNotServed(ClientError):
    title = "Model not served"

    def __init__(self, detail: str | None = None, *, served: list[str] | None = None) -> None:
        super().__init__(detail)
        self.served = sorted(served or [])


class JobNotFound(ClientError):
    title = "Job not found"


class JobNotFinished(ClientError):
    title = "Job has not succeeded"


class ResultGone(ClientError):
    title = "Result no longer available"


class JobAlreadyFinished(ClientError):
    title = "Job already finished"


class Unauthorized(ClientError):
    title = "Missing or invalid API key"


class Forbidden(ClientError):
    title = "Not allowed"


class IdempotencyKeyInUse(ClientError):
    title = "Idempotency key in use"


class IdempotencyKeyMismatch(ClientError):
    title = "Idempotency key reused for a different request"


class Overloaded(SpaSemSRError):
    title = "Service overloaded"

    def __init__(self, detail: str | None = None, *, retry_after_seconds: int = 30) -> None:
        super().__init__(detail)
        self.retry_after_seconds = retry_after_seconds


class RateLimited(Overloaded):
    title = "Rate limit exceeded"


class DependencyUnavailable(SpaSemSRError):
    title = "Dependency unavailable"
    retry_after_seconds: int = 5
    """What a 503 tells clients to wait: outages of Redis or storage are usually short."""


class QueueUnavailable(DependencyUnavailable):
    title = "Job queue unavailable"


class StorageUnavailable(DependencyUnavailable):
    title = "Object storage unavailable"


class JobError(SpaSemSRError):
    title = "Job failed"


class JobCanceled(JobError):
    title = "Job canceled"


class InputMissing(JobError):
    title = "Job input missing"


class QueueTimeout(JobError):
    title = "Waited too long in the queue"


class RunTimeout(JobError):
    title = "Ran too long"


class WorkerLost(JobError):
    title = "Worker lost"


class OutOfMemory(JobError):
    title = "Out of device memory"


class UpscaleFailed(JobError):
    title = "Upscaling failed"
