"""``Prefer: wait`` (RFC 7240): answer when the job has ended, or when the wait runs out.

Replicate's clients send ``Prefer: wait`` (or ``wait=N`` seconds) to get a finished
prediction in the create call; the same works on ``POST /v1/jobs``. The wait is bounded by
``api.max_prefer_wait_seconds`` (a connection held for minutes is a slow-client attack we would
be hosting ourselves), and it polls the job record without blocking the event loop.
"""

from __future__ import annotations

import asyncio
import re
import time

from fastapi.concurrency import run_in_threadpool

from core.jobs import JobRecord
from core.records import JobStore

_WAIT = re.compile(r"(?:^|[,;\s])wait(?:\s*=\s*(\d+))?(?=$|[,;\s])", re.IGNORECASE)
POLL_SECONDS = 0.1


def requested_wait(prefer: str | None, *, max_seconds: float) -> float | None:
    """Seconds to wait that a ``Prefer`` header asks for (``wait`` alone: the maximum);
    ``None`` when it asks for no wait."""
    if not prefer:
        return None
    match = _WAIT.search(prefer)
    if match is None:
        return None
    asked = float(match.group(1)) if match.group(1) else max_seconds
    return min(asked, max_seconds)


async def wait_for_end(jobs: JobStore, job_id: str, seconds: float) -> JobRecord:
    """The job's record once it is final, or as it stands when ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while True:
        record = await run_in_threadpool(jobs.get, job_id)
        if record.status.is_terminal or time.monotonic() >= deadline:
            return record
        await asyncio.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
