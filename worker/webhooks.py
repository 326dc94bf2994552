"""The RQ tasks that deliver webhooks (see ``core.webhooks``), and a prediction's events.

They run on the workers' lowest-priority queue. The completion of a job
(``deliver_job_webhook``) is retried: RQ re-runs a failed attempt after the configured backoff
intervals (its scheduler holds the delayed retries), and the job record shows the delivery
state. A job of ``POST /v1/jobs`` gets the job object; a prediction (a job with
``webhook_events``) gets Replicate's prediction object, for each event of its filter: ``start``
and ``output``/``logs`` (``PredictionEvents``: a snapshot of the prediction as it was, delivered
once, best effort, by the worker's own sender thread while the job runs: the webhook queue is
served only between jobs), and ``completed``.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError
from rq import get_current_job

from core.errors import SpaSemSRError
from core.jobs import JobRecord, WebhookEvent
from core.owned import OwnedJobs
from core.predictions import prediction
from core.webhooks import deliver
from worker.runtime import WorkerRuntime, current_runtime

logger = logging.getLogger(__name__)

EVENT_BACKLOG = 64
"""Intermediate events a worker holds for delivery; beyond it, new ones are dropped (logged):
a receiver that slow would only see stale progress."""
PROGRESS_INTERVAL_SECONDS = 0.5
"""At most one ``output``/``logs`` delivery per interval while a job runs (each step of a
diffusion job changes its logs); the last change is always sent."""


def webhook_payload(record: JobRecord, public_url: str | None) -> dict[str, Any]:
    base = (public_url or "").rstrip("/")
    return {
        "id": record.id,
        "status": record.status.value,
        "model": record.model.value if record.model else None,
        "model_trained": record.model_trained,
        "created_at": record.created_at.isoformat(),
        "finished_at": record.finished_at.isoformat() if record.finished_at else None,
        "output": record.output.model_dump(mode="json") if record.output else None,
        "error": record.error.model_dump() if record.error else None,
        "timings": record.timings,
        "links": {
            "self": f"{base}/v1/jobs/{record.id}",
            "result": f"{base}/v1/jobs/{record.id}/result",
        },
    }


def prediction_payload(record: JobRecord, runtime: WorkerRuntime) -> dict[str, Any]:
    """The prediction as ``GET /v1/predictions/{id}`` shows it, with absolute links."""
    settings = runtime.settings
    base = (settings.api.public_url or record.api_url or "").rstrip("/")
    note: dict[str, Any] = {}
    if runtime.connection is not None:
        # Written by the API just after the job was accepted: a start event of a job taken at
        # once may come before it, and then shows the parameters as the input.
        owned = OwnedJobs(runtime.connection, prefix=settings.redis.key_prefix,
                          ttl_seconds=settings.worker.record_ttl_seconds)  # fmt: skip
        note = owned.note(record.id)
    return prediction(record, note, base=base, storage=runtime.storage, settings=settings)


def completion_payload(record: JobRecord, runtime: WorkerRuntime) -> dict[str, Any]:
    if record.webhook_events is not None:
        return prediction_payload(record, runtime)
    return webhook_payload(record, runtime.settings.api.public_url)


def _send(url: str, payload: dict[str, Any], runtime: WorkerRuntime) -> int:
    webhooks = runtime.settings.webhooks
    assert webhooks.secret is not None  # checked by the callers
    return deliver(
        url,
        payload,
        secret=webhooks.secret.get_secret_value(),
        allow_networks=webhooks.allow_networks,
        timeout_seconds=webhooks.timeout_seconds,
    )


def deliver_job_webhook(job_id: str) -> int:
    """The end of a job (``completed``), as the record shows it now; retried by RQ."""
    runtime = current_runtime()
    settings = runtime.settings
    record = runtime.jobs.get(job_id)
    if record.webhook_url is None or settings.webhooks.secret is None:
        return 0
    attempts = int((record.webhook or {}).get("attempts", 0)) + 1
    try:
        status = _send(record.webhook_url, completion_payload(record, runtime), runtime)
    except Exception as exc:
        current = get_current_job()
        retries_left = current.retries_left if current is not None else 0
        state = "retrying" if retries_left else "failed"
        runtime.jobs.update(
            job_id, webhook={"status": state, "attempts": attempts, "error": _describe(exc)}
        )
        logger.warning("webhook for %s failed (attempt %d): %s", job_id, attempts, exc)
        raise
    runtime.jobs.update(job_id, webhook={"status": "delivered", "attempts": attempts})
    return status


def _describe(exc: Exception) -> str:
    """A short reason for the record; never a traceback."""
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def deliver_prediction_event(
    runtime: WorkerRuntime, job_id: str, event: str, payload: dict[str, Any]
) -> int:
    """One intermediate event of a prediction, as it was when it happened; once, best effort:
    a failure is logged, never retried (the next event, or the completion, supersedes it)."""
    secret = runtime.settings.webhooks.secret
    try:
        url = runtime.jobs.get(job_id).webhook_url
        if url is None or secret is None:
            return 0
        return _send(url, payload, runtime)
    except Exception as exc:
        logger.warning("%s webhook for %s not delivered: %s", event, job_id, _describe(exc))
        return 0


SendEvent = Callable[[str, str, dict[str, Any]], None]
"""``(job id, event, prediction)``: hands an intermediate event on for delivery."""


class EventSender:
    """A worker's intermediate prediction webhooks, delivered in order by one thread of its own:
    the job never waits on a receiver, and the events arrive while the job runs."""

    def __init__(self, runtime: WorkerRuntime, *, backlog: int = EVENT_BACKLOG) -> None:
        self._runtime = runtime
        self._pending: queue.Queue[tuple[str, str, dict[str, Any]]] = queue.Queue(backlog)
        thread = threading.Thread(target=self._deliver_forever, name="event-webhooks", daemon=True)
        thread.start()

    def send(self, job_id: str, event: str, payload: dict[str, Any]) -> None:
        try:
            self._pending.put_nowait((job_id, event, payload))
        except queue.Full:
            logger.warning("%s webhook for %s dropped: %d undelivered", event, job_id,
                           self._pending.maxsize)  # fmt: skip

    def drain(self, timeout_seconds: float) -> bool:
        """Wait until every event handed on so far is delivered (or given up), at most
        ``timeout_seconds``; so that the completion, queued next, comes after them."""
        deadline = time.monotonic() + timeout_seconds
        with self._pending.all_tasks_done:
            while self._pending.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._pending.all_tasks_done.wait(remaining)
        return True

    def _deliver_forever(self) -> None:
        while True:
            job_id, event, payload = self._pending.get()
            try:
                deliver_prediction_event(self._runtime, job_id, event, payload)
            finally:
                self._pending.task_done()


_senders: dict[int, EventSender] = {}
_senders_lock = threading.Lock()


def event_sender(runtime: WorkerRuntime) -> EventSender:
    """The runtime's sender, started on its first event (a worker process has one runtime)."""
    with _senders_lock:
        sender = _senders.get(id(runtime))
        if sender is None:
            sender = _senders[id(runtime)] = EventSender(runtime)
        return sender


class PredictionEvents:
    """A running prediction's intermediate webhooks, each with a snapshot of the prediction:
    ``start``, then ``output``/``logs`` at most once per ``interval_seconds``, the last change
    held back by the throttle sent by ``flush``. ``send`` hands them on (default: the runtime's
    :class:`EventSender`)."""

    def __init__(
        self,
        runtime: WorkerRuntime,
        record: JobRecord,
        *,
        interval_seconds: float = PROGRESS_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        send: SendEvent | None = None,
    ) -> None:
        self._runtime = runtime
        self._job_id = record.id
        prediction_hooks = record.webhook_events is not None
        self._start = prediction_hooks and record.wants_webhook("start")
        self._progress: WebhookEvent | None = None
        if prediction_hooks and record.wants_webhook("output", "logs"):
            self._progress = "output" if record.wants_webhook("output") else "logs"
        self._interval = interval_seconds
        self._clock = clock
        self._last = -math.inf
        self._pending = False
        self._send = send
        self._sent = False

    def started(self) -> None:
        if self._start:
            self._queue("start")

    def progressed(self) -> None:
        if self._progress is None:
            return
        now = self._clock()
        if now - self._last < self._interval:
            self._pending = True
            return
        self._last, self._pending = now, False
        self._queue(self._progress)

    def flush(self) -> None:
        """Before the job ends: the last progress, if the throttle held it back, and (with the
        runtime's sender) every event delivered, so that the completion comes after them."""
        if self._pending and self._progress is not None:
            self._pending = False
            self._queue(self._progress)
        if self._sent and self._send is None:
            event_sender(self._runtime).drain(self._runtime.settings.webhooks.timeout_seconds)

    def _queue(self, event: WebhookEvent) -> None:
        try:
            record = self._runtime.jobs.get(self._job_id)
            payload = prediction_payload(record, self._runtime)
        except (RedisError, SpaSemSRError) as exc:
            # Best effort: an event that cannot be read must not fail or hold up the job (an
            # outage of Redis is noticed by the job's own next write).
            logger.warning("%s webhook for %s not sent: %s", event, self._job_id, exc)
            return
        send = self._send if self._send is not None else event_sender(self._runtime).send
        send(self._job_id, event, payload)
        self._sent = True
