"""RQ's own bookkeeping agrees with the job record: a failed upscale is a failed RQ job (so
RQ's failed-job registry and ``failure_ttl`` apply), a succeeded one a finished RQ job; the
worker logs the failure in one line, not as a crash with a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from redis import Redis
from rq import Queue
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.serializers import JSONSerializer

from core.jobs import JobStatus, Priority
from core.models import ModelName
from core.queue import JobQueue, queue_name
from core.settings import Settings
from tests.conftest import ROOT
from tests.worker.runtimes import in_process_runtime
from tests.worker.test_storage_outage import _accept


def test_a_failed_upscale_is_failed_in_rq_too(settings: Settings, tmp_path: Path) -> None:
    runtime = in_process_runtime(settings, settings.storage_root())
    fine, missing = _accept(runtime), _accept(runtime)
    runtime.storage.delete(missing.input_key)  # its input is gone: input-missing
    queue = JobQueue(Redis.from_url(settings.redis.url or ""), prefix="spasemsr")
    for payload in (fine, missing):
        queue.enqueue(payload, Priority.DEFAULT, timeout_seconds=60, keep_seconds=600)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SPASEMSR_REDIS__URL": settings.redis.url or "",
        "SPASEMSR_VAR_DIR": str(settings.var_dir),
        "SPASEMSR_WORKER__MODELS": '["lanczos"]',
        "SPASEMSR_MODEL__DEFAULT": "lanczos",
    }
    worker = subprocess.run(
        [sys.executable, "-m", "cli.main", "worker", "--burst"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert worker.returncode == 0, worker.stderr[-3000:]
    assert runtime.jobs.get(fine.job_id).status is JobStatus.SUCCEEDED
    failed = runtime.jobs.get(missing.job_id)
    assert failed.status is JobStatus.FAILED and failed.error is not None
    assert failed.error.type == "input-missing"
    rq_queue = Queue(
        queue_name("spasemsr", ModelName.LANCZOS, Priority.DEFAULT),
        connection=Redis.from_url(settings.redis.url or ""),
        serializer=JSONSerializer,
    )
    assert FailedJobRegistry(queue=rq_queue).get_job_ids() == [missing.job_id]
    assert FinishedJobRegistry(queue=rq_queue).get_job_ids() == [fine.job_id]
    assert "Traceback" not in worker.stderr
    assert "input-missing" in worker.stderr
