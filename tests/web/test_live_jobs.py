"""The page follows its jobs through their event streams (``GET /v1/jobs/{id}/events``), not by
polling ``GET /v1/jobs/{id}``, and lists the caller's jobs again after a reload (``GET
/v1/jobs``), in headless Chromium against live services.

Where exact stages matter, a stand-in worker moves the job's record on in the service's real
Redis, one step each time the page has shown the previous one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import expect
from redis import Redis

from core.jobs import JobErrorInfo, JobStatus
from core.records import JobStore
from tests.conftest import ServiceProcesses, png_bytes


@pytest.fixture
def calls(page: Any) -> list[tuple[str, str]]:
    """``(method, path)`` of every request the page makes from now on."""
    seen: list[tuple[str, str]] = []
    page.on("request", lambda request: seen.append((request.method, urlsplit(request.url).path)))
    return seen


def _submit(page: Any, name: str) -> Any:
    page.set_input_files("#files", {"name": name, "mimeType": "image/png", "buffer": png_bytes()})
    page.select_option("#scale", "2")
    page.click("#submit")
    job = page.locator(".job", has_text=name)
    expect(job).to_have_attribute("data-job-id", re.compile(r"^[0-9a-f]+$"))
    return job


def test_a_job_completes_through_its_stream_and_is_listed_after_a_reload(
    page: Any, calls: list[tuple[str, str]], web_service: ServiceProcesses, tmp_path: Path
) -> None:
    page.goto(web_service.url + "/")
    expect(page.locator("#model-name")).to_have_text("lanczos 1")
    job = _submit(page, "streamed.png")
    expect(job).to_have_attribute("data-status", "succeeded")
    page.wait_for_selector("#viewer:not([hidden])")
    job_id = job.get_attribute("data-job-id")
    assert ("GET", f"/v1/jobs/{job_id}/events") in calls
    # Followed by its stream: at most the one GET that replaces a broken stream, never a poll.
    assert calls.count(("GET", f"/v1/jobs/{job_id}")) <= 1, calls

    calls.clear()
    page.reload()
    listed = page.locator(f".job[data-job-id='{job_id}']")
    expect(listed).to_have_attribute("data-status", "succeeded")
    assert listed.get_attribute("data-restored") == "true"
    assert listed.locator(".job-name").inner_text() == "streamed.png"  # kept by this browser
    assert listed.locator(".job-status").inner_text() == "succeeded"
    assert ("GET", "/v1/jobs") in calls
    assert ("GET", f"/v1/jobs/{job_id}") not in calls  # the list says it all
    assert listed.locator(".job-view").is_hidden()  # no input file in this page to compare
    with page.expect_download() as info:
        listed.locator(".job-download").click()
    assert info.value.suggested_filename == "streamed.x2.png"
    served = httpx.get(f"{web_service.url}/v1/jobs/{job_id}/result").content
    assert Path(info.value.path()).read_bytes() == served


def test_each_stage_is_shown_live_and_after_a_reload(
    page: Any, calls: list[tuple[str, str]], workerless_service: ServiceProcesses
) -> None:
    store = JobStore(
        Redis.from_url(workerless_service.env["SPASEMSR_REDIS__URL"]),
        prefix="spasemsr",
        ttl_seconds=600,
    )
    page.goto(workerless_service.url + "/")
    job = _submit(page, "stages.png")
    status = job.locator(".job-status")
    expect(status).to_have_text("queued (next)")
    job_id = job.get_attribute("data-job-id")
    assert store.transition(
        job_id,
        from_statuses=[JobStatus.QUEUED],
        to=JobStatus.PROCESSING,
        progress={"stage": "denoise", "step": 1, "total": 4},
    )
    expect(status).to_have_text("processing: denoise 1/4")
    assert job.locator(".job-progress").evaluate("bar => bar.value") == 0.25
    store.update(job_id, progress={"stage": "denoise", "step": 2, "total": 4})
    expect(status).to_have_text("processing: denoise 2/4")

    # A reload lists the running job again and follows it on.
    page.reload()
    job = page.locator(f".job[data-job-id='{job_id}']")
    status = job.locator(".job-status")
    expect(status).to_have_text("processing: denoise 2/4")
    assert job.locator(".job-name").inner_text() == "stages.png"
    store.update(job_id, progress={"stage": "write", "step": 0, "total": 1})
    expect(status).to_have_text("processing: write 0/1")
    error = JobErrorInfo(type="out-of-memory", title="Out of GPU memory", detail="Even tiles.")
    assert store.transition(
        job_id, from_statuses=[JobStatus.PROCESSING], to=JobStatus.FAILED, error=error
    )
    expect(status).to_have_text("failed")
    expect(job.locator(".job-error")).to_contain_text("Out of GPU memory")
    assert job.locator(".job-cancel").is_hidden()

    # Two streams (one per page load) carried every change; the job was never polled.
    assert calls.count(("GET", f"/v1/jobs/{job_id}/events")) == 2, calls
    assert calls.count(("GET", f"/v1/jobs/{job_id}")) == 0, calls
