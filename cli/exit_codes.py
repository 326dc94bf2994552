"""Exit codes of the ``spasemsr`` command that scripts can rely on, and the error mapping."""

from __future__ import annotations

from enum import IntEnum

from spasemsr_client.errors import (
    ClientError,
    JobCanceled,
    JobUnsuccessful,
    Overloaded,
    ProblemError,
    ServerError,
    ServiceUnavailable,
    ServiceUnreachable,
    WaitTimeout,
)


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    """A job failed, or the service had an internal error."""
    USAGE = 2
    """Bad command line: unknown option, value out of bounds, missing input file."""
    UNAVAILABLE = 3
    """The service cannot be reached, or answered 503 (dependency down, not ready)."""
    REJECTED = 4
    """The service refused the request: bad image, bad parameter, unknown job, 409."""
    OVERLOADED = 5
    """The queue stayed full (429) through every retry."""
    CANCELED = 6
    """A job was canceled."""
    TIMEOUT = 7
    """A job did not finish within ``--timeout``."""
    INTERRUPTED = 130
    """Ctrl-C (unfinished jobs of ``submit`` are canceled first)."""


EPILOG = (
    "Exit codes: 0 ok, 1 job failed, 2 usage error, 3 service unreachable or unavailable, "
    "4 request rejected (4xx), 5 queue full (429), 6 job canceled, 7 timed out, 130 Ctrl-C. "
    "With several jobs, the highest code wins."
)


def exit_code_for(error: ClientError) -> ExitCode:
    """The exit code that a client error ends the command with."""
    if isinstance(error, ServiceUnreachable | ServiceUnavailable):
        return ExitCode.UNAVAILABLE
    if isinstance(error, Overloaded):
        return ExitCode.OVERLOADED
    if isinstance(error, WaitTimeout):
        return ExitCode.TIMEOUT
    if isinstance(error, JobCanceled):
        return ExitCode.CANCELED
    if isinstance(error, JobUnsuccessful | ServerError):
        return ExitCode.FAILED
    if isinstance(error, ProblemError):
        return ExitCode.REJECTED
    return ExitCode.FAILED
