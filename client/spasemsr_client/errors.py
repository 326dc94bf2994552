"""Typed errors of the client, mapped from the service's problem+json answers.

ClientError
├── ServiceUnreachable          no HTTP answer at all (refused, DNS, timeout)
├── WaitTimeout                 a job did not finish within the time the caller gave
├── JobUnsuccessful             a job ended without a result
│   ├── JobFailed
│   └── JobCanceled
└── ProblemError                the service answered with an error status (RFC 9457)
    ├── BadRequest              400
    ├── AuthenticationFailed    401, 403
    ├── JobNotFound             404
    ├── Conflict                409
    │   ├── JobNotFinished
    │   └── JobAlreadyFinished
    ├── UploadTooLarge          413
    │   └── TooManyPixels
    ├── UnsupportedImage        415
    ├── InvalidParameters       422
    │   ├── CorruptImage
    │   └── ModelNotServed      (``served``: the models the service does serve)
    ├── Overloaded              429 (``retry_after``)
    ├── ServiceUnavailable      503 (``retry_after`` when given)
    └── ServerError             other 5xx
"""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, Any

from spasemsr_client.models import Problem

if TYPE_CHECKING:
    import httpx

    from spasemsr_client.models import Job


class ClientError(Exception):
    """Base of every error the client raises."""


class ServiceUnreachable(ClientError):
    """The service gave no HTTP answer (connection refused, name not resolved, timed out)."""


class WaitTimeout(ClientError):
    def __init__(self, job_id: str, seconds: float) -> None:
        super().__init__(f"job {job_id} did not finish within {seconds:g} s")
        self.job_id = job_id
        self.seconds = seconds


class JobUnsuccessful(ClientError):
    """A job ended as ``failed`` or ``canceled``; ``job`` is its final state."""

    def __init__(self, job: Job) -> None:
        reason = f"{job.error.title}: {job.error.detail}" if job.error else job.status.value
        super().__init__(f"job {job.id} {job.status.value}: {reason}")
        self.job = job


class JobFailed(JobUnsuccessful):
    pass


class JobCanceled(JobUnsuccessful):
    pass


class ProblemError(ClientError):
    """The service answered with an error status; ``problem`` is its problem+json body."""

    def __init__(self, status_code: int, problem: Problem, *, retry_after: float | None) -> None:
        title = problem.title or f"HTTP {status_code}"
        message = f"{status_code} {title}"
        if problem.detail and problem.detail != title:
            message += f": {problem.detail}"
        super().__init__(message)
        self.status_code = status_code
        self.problem = problem
        self.retry_after = retry_after

    @property
    def title(self) -> str:
        return self.problem.title

    @property
    def detail(self) -> str:
        return self.problem.detail


class BadRequest(ProblemError):
    pass


class AuthenticationFailed(ProblemError):
    pass


class JobNotFound(ProblemError):
    pass


class Conflict(ProblemError):
    pass


class JobNotFinished(Conflict):
    pass


class JobAlreadyFinished(Conflict):
    pass


class UploadTooLarge(ProblemError):
    pass


class TooManyPixels(UploadTooLarge):
    pass


class UnsupportedImage(ProblemError):
    pass


class InvalidParameters(ProblemError):
    pass


class CorruptImage(InvalidParameters):
    pass


class ModelNotServed(InvalidParameters):
    """The job asked for a model that no worker of this service serves."""

    @property
    def served(self) -> list[str]:
        """The models the service serves (its ``served`` problem member), sorted."""
        found = (self.problem.model_extra or {}).get("served")
        if not isinstance(found, list):
            return []
        return sorted(str(name) for name in found)


class Overloaded(ProblemError):
    pass


class RateLimited(Overloaded):
    pass


class ServiceUnavailable(ProblemError):
    pass


class ServerError(ProblemError):
    pass


# The problem ``type`` names the exact condition; the status is the fallback.
_BY_TYPE: dict[str, type[ProblemError]] = {
    "too-many-pixels": TooManyPixels,
    "corrupt-image": CorruptImage,
    "model-not-served": ModelNotServed,
    "job-not-finished": JobNotFinished,
    "job-already-finished": JobAlreadyFinished,
    "rate-limited": RateLimited,
}
_BY_STATUS: dict[int, type[ProblemError]] = {
    400: BadRequest,
    401: AuthenticationFailed,
    403: AuthenticationFailed,
    404: JobNotFound,
    409: Conflict,
    413: UploadTooLarge,
    415: UnsupportedImage,
    422: InvalidParameters,
    429: Overloaded,
    503: ServiceUnavailable,
}


def error_class_for(status_code: int, problem_type: str) -> type[ProblemError]:
    name = problem_type.rstrip("/").rsplit("/", 1)[-1]
    if name in _BY_TYPE:
        return _BY_TYPE[name]
    if status_code in _BY_STATUS:
        return _BY_STATUS[status_code]
    return ServerError if status_code >= 500 else BadRequest


def parse_problem(response: httpx.Response) -> Problem:
    """The problem document of an error answer; a plain one when the body is not JSON."""
    body: Any = None
    with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
        body = response.json()
    if isinstance(body, dict):
        return Problem.model_validate(body)
    return Problem(
        title=response.reason_phrase or f"HTTP {response.status_code}",
        status=response.status_code,
        detail=response.text[:500],
    )


def error_from_response(
    response: httpx.Response, *, retry_after: float | None = None
) -> ProblemError:
    problem = parse_problem(response)
    error_class = error_class_for(response.status_code, problem.type)
    return error_class(response.status_code, problem, retry_after=retry_after)
