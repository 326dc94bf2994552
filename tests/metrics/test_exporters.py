"""The exporters in-process: worker scrape ports, per-job observations, the API's Redis view."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from app.main import create_app
from core.embedded_redis import EmbeddedRedis
from core.jobs import JobStatus, Priority, utcnow
from core.models import ALL_MODELS, ModelName
from core.settings import Settings, WorkerSettings
from core.workers import WorkerInfo, WorkerRegistry, WorkerState
from tests.conftest import free_port, png_bytes
from worker.metrics import WorkerMetrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
def served() -> Iterator[list[WorkerMetrics]]:
    started: list[WorkerMetrics] = []
    yield started
    for metrics in started:
        metrics.stop()


def test_workers_on_one_host_take_consecutive_ports(served: list[WorkerMetrics]) -> None:
    first = free_port()
    settings = WorkerSettings(metrics_port=first, metrics_port_span=4)
    ports = []
    for _ in range(2):
        metrics = WorkerMetrics()
        served.append(metrics)
        ports.append(metrics.serve(settings))
    assert ports[0] == first and ports[1] is not None and first < ports[1] < first + 4
    assert WorkerMetrics().serve(WorkerSettings(metrics_port=None)) is None
    served[1].count_job(JobStatus.FAILED, ModelName.LANCZOS)
    samples = _samples(httpx.get(f"http://127.0.0.1:{ports[1]}/metrics").text)
    lanczos = ("model", "lanczos")
    assert samples[("spasemsr_jobs_total", (lanczos, ("outcome", "failed")))] == 1
    assert samples[("spasemsr_jobs_total", (lanczos, ("outcome", "succeeded")))] == 0
    assert samples[("spasemsr_model_warm", (lanczos,))] == 0


def test_only_the_fixed_stages_are_exported() -> None:
    metrics = WorkerMetrics()
    model = ModelName.REALESRGAN_X4PLUS
    metrics.observe_inference(model, {"grounding": 0.2, "denoise": 3.0, "total": 4.0, "text": 0.1})
    metrics.observe_queue_wait("high", model, 12.5)
    samples = _samples(metrics.registry_text())
    count = "spasemsr_inference_seconds_count"
    label = ("model", model.value)
    assert samples[(count, (label, ("stage", "denoise")))] == 1
    assert samples[(count, (label, ("stage", "encode")))] == 0
    assert samples[(count, (("model", "spasemsr"), ("stage", "denoise")))] == 0
    assert not any(("stage", "text") in labels for _, labels in samples)
    assert samples[("spasemsr_queue_wait_seconds_sum", (label, ("queue", "high")))] == 12.5


def test_a_worker_exports_only_the_models_it_serves() -> None:
    """Bounded labels, and no model reported cold by a worker that was never meant to hold it."""
    metrics = WorkerMetrics([ModelName.SPASEMSR, ModelName.LANCZOS])
    samples = _samples(metrics.registry_text())
    models = {value for _, labels in samples for name, value in labels if name == "model"}
    assert models == {"spasemsr", "lanczos"}
    assert samples[("spasemsr_model_warm", (("model", "spasemsr"),))] == 0
    jobs = {labels for name, labels in samples if name == "spasemsr_jobs_total"}
    assert len(jobs) == 2 * 3  # models x outcomes, from the start
    # Every value of every model label belongs to the catalogue.
    everything = _samples(WorkerMetrics().registry_text())
    labelled = {value for _, labels in everything for name, value in labels if name == "model"}
    assert labelled == {model.value for model in ALL_MODELS}


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def test_api_reports_queue_and_workers_from_redis(
    api: TestClient, settings: Settings, redis_server: EmbeddedRedis
) -> None:
    registry = WorkerRegistry(Redis.from_url(redis_server.url), prefix="spasemsr")
    for index, state in enumerate([WorkerState.IDLE, WorkerState.BUSY, WorkerState.BUSY]):
        registry.announce(
            WorkerInfo(name=f"w{index}", state=state, pid=index, hostname="h", started_at=utcnow()),
            ttl_seconds=60,
        )
    for _ in range(2):
        answer = api.post("/v1/jobs", files={"image": ("a.png", png_bytes())}, data={"scale": "2"})
        assert answer.status_code == 202, answer.text
    samples = _samples(api.get("/metrics").text)
    assert settings.model.default is ModelName.LANCZOS  # requests naming no model get it
    lanczos = ("model", ModelName.LANCZOS.value)
    assert samples[("spasemsr_queue_depth", (lanczos, ("queue", "default")))] == 2
    assert samples[("spasemsr_queue_depth", (lanczos, ("queue", "high")))] == 0
    assert samples[("spasemsr_queue_depth", (("model", "spasemsr"), ("queue", "default")))] == 0
    assert samples[("spasemsr_queue_oldest_age_seconds", (lanczos, ("queue", "default")))] >= 0
    # One series per model and priority: every queue, served or not, is visible.
    depths = [labels for name, labels in samples if name == "spasemsr_queue_depth"]
    assert len(depths) == len(ALL_MODELS) * len(Priority)
    assert samples[("spasemsr_workers", (("state", "busy"),))] == 2
    assert samples[("spasemsr_workers", (("state", "idle"),))] == 1
    assert samples[("spasemsr_redis_up", ())] == 1
    key = (
        "spasemsr_http_requests_total",
        (("method", "POST"), ("route", "/v1/jobs"), ("status", "202")),
    )
    assert samples[key] == 2


def test_api_says_redis_is_down_instead_of_an_empty_queue(
    api: TestClient, redis_server: EmbeddedRedis
) -> None:
    redis_server.stop()
    answer = api.get("/metrics")
    assert answer.status_code == 200
    samples = _samples(answer.text)
    assert samples[("spasemsr_redis_up", ())] == 0
    assert not any(name == "spasemsr_queue_depth" for name, _ in samples)


def test_worker_metrics_need_no_gpu_or_nvml() -> None:
    """The CUDA collector is only registered for a CUDA model; on CPU nothing GPU is exported."""
    metrics = WorkerMetrics()
    assert "spasemsr_gpu" not in metrics.registry_text()
