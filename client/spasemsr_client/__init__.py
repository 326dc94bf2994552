"""Python client of SpaSemSR Serve (httpx and pydantic only; the distribution
``spasemsr-client``): ``SpaSemSRClient`` and ``AsyncSpaSemSRClient``.

Typed results (``Job``, ``ModelList``, ``ModelDescription``), typed errors mapped from the
service's problem+json answers (``spasemsr_client.errors``), retries of 429/503 honouring
``Retry-After``, live progress from each job's Server-Sent Events (``events``, ``wait``).
"""

from spasemsr_client._common import (
    DEFAULT_URL,
    ImageSource,
    JobOptions,
    ProgressHandler,
    RetryPolicy,
)
from spasemsr_client.aio import AsyncSpaSemSRClient
from spasemsr_client.errors import (
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
from spasemsr_client.models import (
    MODEL_NAMES,
    Health,
    Job,
    JobStatus,
    ModelDescription,
    ModelList,
    Problem,
    Progress,
)
from spasemsr_client.sync import SpaSemSRClient

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
