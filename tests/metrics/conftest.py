"""A live service scraped by a real Prometheus server, shared by the tests of this module."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from core.embedded_redis import EmbeddedRedis
from tests.conftest import ServiceProcesses, free_port, png_bytes, start_service, wait_for_status

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "spasemsr.rules.yml"
QUEUED_BEFORE_WORKERS = 6
QUEUED_WHILE_RUNNING = 3
WORKERS = 2
MODEL = "lanczos"
"""The one model both workers hold and every job gets (the API's default)."""


@dataclass
class Stack:
    service: ServiceProcesses
    worker_ports: list[int]
    prometheus_url: str
    jobs: int

    def query(self, promql: str) -> list[dict[str, Any]]:
        answer = httpx.get(
            f"{self.prometheus_url}/api/v1/query", params={"query": promql}, timeout=10
        ).json()
        assert answer["status"] == "success", (promql, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def value(self, promql: str) -> float:
        result = self.query(promql)
        assert len(result) == 1, (promql, result)
        return float(result[0]["value"][1])

    def wait_for(self, promql: str, expected: float, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            seen = self.query(promql)
            if seen and float(seen[0]["value"][1]) == expected:
                return
            time.sleep(0.25)
        raise TimeoutError(f"{promql} never became {expected}: {seen}")


def prometheus_config(api_port: int, worker_ports: list[int]) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the same jobs and rules, pointed at loopback."""
    config: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "evaluation_interval": "1s",
    }
    config["rule_files"] = [str(RULES)]
    targets = {
        "spasemsr-api": [f"127.0.0.1:{api_port}"],
        "spasemsr-worker": [f"127.0.0.1:{port}" for port in worker_ports],
    }
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs")
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    return config


def _start_prometheus(binary: str, config: dict[str, Any], directory: Path) -> tuple[Any, str]:
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (directory / "prometheus.log").open("ab")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, (directory / "prometheus.log").read_text()
        try:
            if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise TimeoutError("prometheus did not become ready")


def _submit(client: httpx.Client, priority: str) -> str:
    answer = client.post(
        "/v1/jobs",
        files={"image": ("a.png", png_bytes(24, 16))},
        data={"scale": "2", "priority": priority},
    )
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["id"]
    return job_id


def _rejected_uploads(client: httpx.Client) -> None:
    """One upload refused for each of: bytes, format, parameters (and a 404 on a job)."""
    assert client.post("/v1/jobs", files={"image": ("a.png", b"\0" * 300_000)}).status_code == 413
    assert client.post("/v1/jobs", files={"image": ("a.png", b"not an image")}).status_code == 415
    bad_scale = client.post(
        "/v1/jobs", files={"image": ("a.png", png_bytes())}, data={"scale": "3"}
    )
    assert bad_scale.status_code == 422
    assert client.get("/v1/jobs/0123456789abcdef0123456789abcdef").status_code == 404


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "no prometheus server: Debian's `prometheus` package provides it "
            "(`make system-deps` installs it as root)"
        )
    directory = tmp_path_factory.mktemp("stack")
    redis_dir = Path(tempfile.mkdtemp(prefix="ssr-m-"))  # short: unix socket path limit
    redis = EmbeddedRedis(redis_dir, appendonly=False).start()
    service: ServiceProcesses | None = None
    prometheus = None
    try:
        service = start_service(
            redis.url,
            directory,
            workers=0,
            SPASEMSR_WORKER__MODELS=f'["{MODEL}"]',
            SPASEMSR_MODEL__DEFAULT=MODEL,
            SPASEMSR_API__MAX_UPLOAD_BYTES="100000",
        )
        worker_ports = [free_port() for _ in range(WORKERS)]
        prometheus, url = _start_prometheus(
            binary, prometheus_config(service.port, worker_ports), directory
        )
        stack = Stack(service, worker_ports, url, QUEUED_BEFORE_WORKERS + QUEUED_WHILE_RUNNING)
        with httpx.Client(base_url=service.url, timeout=30) as client:
            # Before any worker: a 503 (no model served) and a backlog with an oldest age.
            assert client.get("/v1/model").status_code == 503
            priorities = ["high", "default", "low"]
            queued = [_submit(client, priorities[i % 3]) for i in range(QUEUED_BEFORE_WORKERS)]
            stack.wait_for("sum(spasemsr_queue_depth)", QUEUED_BEFORE_WORKERS)
            time.sleep(1.5)  # an oldest age above zero is scraped
            for port in worker_ports:
                service.env["SPASEMSR_WORKER__METRICS_PORT"] = str(port)
                service.start_worker(wait_ready=False)
            service.wait_ready()
            # More jobs while the workers run, and rejected uploads, from another thread.
            submitter = threading.Thread(target=_rejected_uploads, args=(client,))
            submitter.start()
            queued += [_submit(client, "default") for _ in range(QUEUED_WHILE_RUNNING)]
            submitter.join()
            for job_id in queued:
                assert wait_for_status(client, job_id, {"succeeded", "failed"})["status"] == (
                    "succeeded"
                )
        stack.wait_for('sum(spasemsr_jobs_total{outcome="succeeded"})', stack.jobs)
        stack.wait_for("sum(spasemsr_queue_depth)", 0)
        yield stack
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=15)
        if service is not None:
            service.stop()
        redis.stop()
        shutil.rmtree(redis_dir, ignore_errors=True)
