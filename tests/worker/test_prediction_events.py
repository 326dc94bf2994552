"""A running prediction's intermediate webhooks: which events, the throttle on progress, the
last change always sent, jobs of /v1/jobs left alone; and the worker's sender, which delivers
them to a real receiver in order without holding up the job."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from core.jobs import (
    ImageFormat,
    ImageInfo,
    JobParameters,
    JobRecord,
    JobStatus,
    Priority,
    Progress,
    WebhookEvent,
    input_key_for,
    new_job_id,
    output_key_for,
    utcnow,
)
from core.models import ModelName
from core.settings import Settings
from core.webhooks import SIGNATURE_HEADER, verify
from tests.app.test_prediction_webhooks import Receiver
from tests.worker.runtimes import in_process_runtime
from worker.runtime import WorkerRuntime
from worker.webhooks import EventSender, PredictionEvents


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def runtime(settings: Settings, tmp_path: Path) -> WorkerRuntime:
    return in_process_runtime(settings, tmp_path / "storage")


def _record(
    runtime: WorkerRuntime, events: list[WebhookEvent] | None, url: str | None = "https://x.test/h"
) -> JobRecord:
    job_id = new_job_id()
    record = JobRecord(
        id=job_id,
        status=JobStatus.PROCESSING,
        priority=Priority.DEFAULT,
        parameters=JobParameters(model=ModelName.LANCZOS),
        input=ImageInfo(width=4, height=4, format=ImageFormat.PNG, bytes=10),
        input_key=input_key_for(job_id),
        output_key=output_key_for(job_id, ImageFormat.PNG),
        created_at=utcnow(),
        progress=Progress(stage="starting"),  # as the worker starts it
        webhook_url=url,
        webhook_events=events,
        api_url="https://sr.example.com",
    )
    runtime.jobs.create(record)
    return record


class Sent(list[tuple[str, dict[str, Any]]]):
    """The events handed on for delivery, in order."""

    def __call__(self, job_id: str, event: str, payload: dict[str, Any]) -> None:
        self.append((event, payload))


def _step(runtime: WorkerRuntime, record: JobRecord, events: PredictionEvents, step: int) -> None:
    runtime.jobs.update(record.id, progress={"stage": "denoise", "step": step, "total": 4})
    events.progressed()


def test_progress_is_throttled_and_its_last_change_sent(runtime: WorkerRuntime) -> None:
    record = _record(runtime, ["start", "output", "logs", "completed"])
    clock = Clock()
    sent = Sent()
    events = PredictionEvents(runtime, record, interval_seconds=0.5, clock=clock, send=sent)
    events.started()
    _step(runtime, record, events, 1)  # sent: the first change
    clock.now += 0.2
    _step(runtime, record, events, 2)  # held back
    clock.now += 0.4
    _step(runtime, record, events, 3)  # 0.6 s after the last sent: sent
    clock.now += 0.1
    _step(runtime, record, events, 4)  # held back...
    events.flush()  # ...and sent before the end
    events.flush()  # nothing more to send
    queued = list(sent)
    assert [event for event, _ in queued] == ["start", "output", "output", "output"]
    logs = [payload["logs"] for _, payload in queued]
    assert logs[0] == "starting" and "1/4" in logs[1] and "3/4" in logs[2] and "4/4" in logs[3]
    assert {payload["urls"]["get"] for _, payload in queued} == {
        f"https://sr.example.com/v1/predictions/{record.id}"
    }
    assert {payload["status"] for _, payload in queued} == {"processing"}


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        (["start", "completed"], ["start"]),
        (["logs"], ["logs"]),
        (["completed"], []),
        (None, []),  # a job of POST /v1/jobs: its webhook is the completion only
    ],
)
def test_only_the_filtered_events_are_queued(
    runtime: WorkerRuntime, events: list[WebhookEvent] | None, expected: list[str]
) -> None:
    record = _record(runtime, events)
    sent = Sent()
    announcer = PredictionEvents(runtime, record, clock=Clock(), send=sent)
    announcer.started()
    _step(runtime, record, announcer, 1)
    announcer.flush()
    assert [event for event, _ in sent] == expected


def test_no_webhook_url_no_events(runtime: WorkerRuntime) -> None:
    record = _record(runtime, ["start", "output", "logs", "completed"], url=None)
    sent = Sent()
    events = PredictionEvents(runtime, record, clock=Clock(), send=sent)
    events.started()
    _step(runtime, record, events, 1)
    assert sent == []


def test_the_sender_delivers_in_order_without_holding_up_the_job(
    settings: Settings, tmp_path: Path
) -> None:
    """The receiver holds its first delivery: handing events on still returns at once, and
    once it answers, every event arrives in the order it was sent, signed."""
    receiver = Receiver()
    release = threading.Event()
    original = receiver.record

    def held(path: str, headers: dict[str, str], body: bytes) -> None:
        release.wait(30)
        original(path, headers, body)

    receiver.record = held  # type: ignore[method-assign]
    secret = "worker-events-secret"
    webhooks = settings.webhooks.model_copy(
        update={"secret": SecretStr(secret), "allow_networks": ["127.0.0.0/8"]}
    )
    runtime = in_process_runtime(
        settings.model_copy(update={"webhooks": webhooks}), tmp_path / "storage"
    )
    record = _record(runtime, None, url=f"{receiver.url}/hook")
    sender = EventSender(runtime)
    try:
        for step in range(3):
            sender.send(record.id, "output", {"step": step})
        assert not sender.drain(0.2)  # still held by the receiver, and the job went on
        release.set()
        assert sender.drain(30)
        bodies = receiver.calls["/hook"]
        assert [json.loads(body)["step"] for _, body in bodies] == [0, 1, 2]
        assert all(verify(secret, body, headers[SIGNATURE_HEADER]) for headers, body in bodies)
    finally:
        release.set()
        receiver.server.shutdown()
