"""Python client of SpaSemSR Serve (httpx only): ``SpaSemSRClient`` and ``AsyncSpaSemSRClient``.

Typed results (``Job``, ``ModelList``, ``ModelDescription``), typed errors mapped from the service's
problem+json answers (``client.errors``), retries of 429/503 honouring ``Retry-After``.
"""

from client._common import DEFAULT_URL, ImageSource, JobOptions, ProgressHandler, RetryPolicy
from client.aio import AsyncSpaSemSRClient
from client.errors import (
    ClientError,
    JobCanceled,
    JobFailed,
    JobNotFound,
    JobUnsuccessful,
    ModelNotServed,
    Overloaded,
    ProblemError,
    ServiceUnavailable,
    ServiceUnreachable,
    WaitTimeout,
)
from client.models import (
    MODEL_NAMES,
    Health,
    Job,
    JobStatus,
    ModelDescription,
    ModelList,
    Problem,
    Progress,
)
from client.sync import SpaSemSRClient

__all__ = [
    "DEFAULT_URL",
    "MODEL_NAMES",
    "AsyncSpaSemSRClient",
    "ClientError",
    "Health",
    "ImageSource",
    "Job",
    "JobCanceled",
    "JobFailed",
    "JobNotFound",
    "JobOptions",
    "JobStatus",
    "JobUnsuccessful",
    "ModelDescription",
    "ModelList",
    "ModelNotServed",
    "Overloaded",
    "Problem",
    "ProblemError",
    "Progress",
    "ProgressHandler",
    "RetryPolicy",
    "ServiceUnavailable",
    "ServiceUnreachable",
    "SpaSemSRClient",
    "WaitTimeout",
]
