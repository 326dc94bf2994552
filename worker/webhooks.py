"""The RQ task that delivers a finished job's webhook (see ``core.webhooks``).

Runs on the workers' lowest-priority queue; RQ re-runs a failed attempt after the configured
backoff intervals (its scheduler holds the delayed retries), and the job record shows the
delivery state.
"""

from __future__ import annotations

import logging
from typing import Any

from rq import get_current_job

from core.jobs import JobRecord
from core.webhooks import deliver
from worker.runtime import current_runtime

logger = logging.getLogger(__name__)


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


def deliver_job_webhook(job_id: str) -> int:
    runtime = current_runtime()
    settings = runtime.settings
    record = runtime.jobs.get(job_id)
    if record.webhook_url is None or settings.webhooks.secret is None:
        return 0
    attempts = int((record.webhook or {}).get("attempts", 0)) + 1
    try:
        status = deliver(
            record.webhook_url,
            webhook_payload(record, settings.api.public_url),
            secret=settings.webhooks.secret.get_secret_value(),
            allow_networks=settings.webhooks.allow_networks,
            timeout_seconds=settings.webhooks.timeout_seconds,
        )
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
