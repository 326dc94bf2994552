"""How the CLI words a job's state: each thing said once."""

from __future__ import annotations

from typing import Any

from spasemsr_client.errors import JobCanceled

from cli.display import describe, distinct_parts
from cli.remote import error_text, job_lines
from tests.cli.test_models import _job


def _ended(status: str, title: str, detail: str) -> Any:
    return _job(
        status=status,
        queue_position=None,
        error={"type": "x", "title": title, "detail": detail},
        finished_at="2026-01-01T00:01:00+00:00",
    )


def test_a_canceled_job_is_not_canceled_three_times() -> None:
    job = _ended("canceled", "Job canceled", "Job canceled")
    assert describe(job) == "canceled"
    assert dict(job_lines(job))["error"] == "Job canceled"
    running = _ended("canceled", "Job canceled", "Canceled during denoise.")
    assert describe(running) == "canceled: Canceled during denoise."


def test_a_failed_job_keeps_what_its_error_adds() -> None:
    job = _ended("failed", "Waited too long in the queue", "Not started within 3600 s.")
    assert describe(job) == "failed: Waited too long in the queue: Not started within 3600 s."
    assert distinct_parts("failed", "Job failed", "out of memory") == ["failed", "out of memory"]
    assert distinct_parts("a", "", "  ", "A.") == ["a"]


def test_a_job_that_ended_badly_is_an_error_said_once() -> None:
    job = _ended("canceled", "Job canceled", "Job canceled")
    assert error_text(JobCanceled(job)) == f"job {job.id} canceled"
