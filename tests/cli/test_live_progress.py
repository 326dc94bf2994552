"""``spasemsr submit`` (waiting) shows every stage of a job as the job's event stream reports it.

A stand-in worker moves the job on in the service's real Redis, one step each time the command
has printed the previous one: the test proves that each step reached the user while the job
ran, on a machine of any speed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from redis import Redis

from tests.client.live import SIGHTING_SECONDS, STAGES, StandInWorker
from tests.conftest import ROOT, ServiceProcesses, png_bytes

JOB_LINE = re.compile(r"^a\.png: job (?P<id>[0-9a-f]+) ")


def test_submit_shows_each_stage_while_the_job_runs(
    idle_service: ServiceProcesses, tmp_path: Path
) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes())
    command = subprocess.Popen(
        [
            sys.executable, "-m", "cli.main", "submit", str(tmp_path / "a.png"),
            "--url", idle_service.url, "--lines", "--scale", "2", "--no-download",
            "--wait-timeout", str(SIGHTING_SECONDS * 8),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert command.stderr is not None
    shown: list[str] = []
    worker: StandInWorker | None = None
    try:
        for line in command.stderr:
            shown.append(line.rstrip("\n"))
            found = JOB_LINE.match(line)
            if found is None:
                continue
            if worker is None:
                worker = StandInWorker(idle_service, found["id"]).__enter__()
            worker.saw()
        assert command.wait(timeout=SIGHTING_SECONDS) == 0, shown
    finally:
        command.kill()
        if worker is not None:
            worker.__exit__()
        # The stand-in ran the job outside RQ, whose queue still holds it: the other tests
        # of this shared service expect it empty (its queue takes a single job).
        with Redis.from_url(idle_service.env["SPASEMSR_REDIS__URL"]) as redis:
            redis.flushdb()
    assert worker is not None and worker.failure is None, (shown, worker and worker.failure)
    progress = [line.rsplit("] ", 1)[-1] for line in shown if JOB_LINE.match(line)]
    assert progress[0] == "queued (next)"
    expected = [f"{stage} {step}/{total}" for stage, step, total in STAGES]
    assert [p for p in progress if p in expected] == expected
    assert progress[-1] == "succeeded"
