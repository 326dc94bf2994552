"""The worker's Prometheus metrics (DESIGN 2.3), served on one scrape port per worker process.

Why a port per process and not ``prometheus_client``'s multiprocess mode: workers are
independent processes (one per GPU, often one per container or pod, on several machines),
never forked from a common parent, so each one is simply its own scrape target. Its series
are then labelled by Prometheus with the target (``instance``), nothing is shared through
files, and per-process gauges (model warm, GPU memory) keep their meaning. Several workers on
one host take consecutive ports from ``worker.metrics_port`` (see ``deploy/README.md``).

Queue depth and workers by state are not exported here: they are facts about Redis, exported
once by the API at scrape time, so adding workers never double-counts them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
    start_http_server,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from core.jobs import JobStatus, Priority
from core.models import ALL_MODELS, ModelName
from core.settings import WorkerSettings

if TYPE_CHECKING:
    from model.upscalers.base import ModelCard

logger = logging.getLogger(__name__)

QUEUE_WAIT_BUCKETS = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
)  # fmt: skip
"""Seconds from enqueue to start: instant on an idle fleet, up to an hour behind a backlog."""

INFERENCE_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
    1800.0,
)  # fmt: skip
"""Seconds per stage: sub-second grounding up to a half-hour tiled 4x diffusion job."""

INFERENCE_STAGES = ("grounding", "encode", "denoise", "decode", "total")
OUTCOMES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class WorkerMetrics:
    """One worker process's registry; ``serve`` exposes it on its own port."""

    def __init__(self, served: Iterable[ModelName] = ALL_MODELS) -> None:
        self._served = tuple(served)
        served = self._served
        self.registry = CollectorRegistry()
        self.queue_wait = Histogram(
            "spasemsr_queue_wait_seconds",
            "Time from enqueue to the start of processing, by priority queue and model.",
            ["queue", "model"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=self.registry,
        )
        self.inference = Histogram(
            "spasemsr_inference_seconds",
            "Upscaler time per stage and model (GPU stages measured after synchronisation).",
            ["stage", "model"],
            buckets=INFERENCE_BUCKETS,
            registry=self.registry,
        )
        self.jobs = Counter(
            "spasemsr_jobs",
            "Jobs this worker finished, by outcome and model.",
            ["outcome", "model"],
            registry=self.registry,
        )
        self.model_warm = Gauge(
            "spasemsr_model_warm",
            "1 once the model is loaded and warmed up and the worker takes its jobs.",
            ["model"],
            registry=self.registry,
        )
        self.model = Info(
            "spasemsr_model", "Each model this worker serves.", ["model"], registry=self.registry
        )
        self._gpu_watched = False
        # Every bounded label value exists from the start: rates and ratios have data at once.
        for model in served:
            for priority in Priority:
                self.queue_wait.labels(priority.value, model.value)
            for stage in INFERENCE_STAGES:
                self.inference.labels(stage, model.value)
            for outcome in OUTCOMES:
                self.jobs.labels(outcome.value, model.value)
            self.model_warm.labels(model.value).set(0)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def registry_text(self) -> str:
        return generate_latest(self.registry).decode()

    def observe_queue_wait(self, queue: str, model: ModelName, seconds: float) -> None:
        self.queue_wait.labels(queue, model.value).observe(max(0.0, seconds))

    def observe_inference(self, model: ModelName, timings: Mapping[str, float]) -> None:
        """Stage timings of one upscale; stages outside the fixed set are not exported."""
        for stage in INFERENCE_STAGES:
            if stage in timings:
                self.inference.labels(stage, model.value).observe(float(timings[stage]))

    def count_job(self, outcome: JobStatus, model: ModelName) -> None:
        self.jobs.labels(outcome.value, model.value).inc()

    def mark_warm(self, card: ModelCard) -> None:
        self.model.labels(card.name).info(
            {
                "version": card.version,
                "configuration": card.configuration,
                "device": card.device,
                "dtype": card.dtype,
                "trained": str(card.trained).lower(),
            }
        )
        if card.device.startswith("cuda") and not self._gpu_watched:
            self._gpu_watched = True
            self.watch_gpu(card.device)
        self.model_warm.labels(card.name).set(1)

    def mark_cold(self) -> None:
        for model in self._served:
            self.model_warm.labels(model.value).set(0)

    def watch_gpu(self, device: str) -> None:
        """Export the memory and utilisation of the CUDA device the model runs on."""
        self.registry.register(GpuCollector(_device_index(device)))

    def serve(self, settings: WorkerSettings) -> int | None:
        """Start the scrape endpoint; returns its port, or ``None`` when none could be bound."""
        if settings.metrics_port is None:
            return None
        first = settings.metrics_port
        candidates = [0] if first == 0 else range(first, first + settings.metrics_port_span)
        for port in candidates:
            try:
                server, thread = start_http_server(
                    port, addr=settings.metrics_host, registry=self.registry
                )
            except OSError:
                continue
            self._server, self._thread = server, thread
            bound = int(server.server_port)
            logger.info("metrics on http://%s:%d/metrics", settings.metrics_host, bound)
            return bound
        # A worker that cannot export metrics still serves jobs; Prometheus shows it as down.
        logger.error(
            "no free metrics port in %s..%s on %s: this worker exports no metrics",
            first, first + settings.metrics_port_span - 1, settings.metrics_host,
        )  # fmt: skip
        return None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class GpuCollector:
    """GPU memory from torch's allocator counters, utilisation from NVML, read at scrape time.

    ``nvidia-ml-py`` is optional: without it (or without a driver that answers) only the
    torch counters are exported.
    """

    def __init__(self, index: int) -> None:
        import torch

        self._torch = torch
        self._index = index
        self._nvml, self._handle = _open_nvml(torch, index)

    def describe(self) -> Iterable[Metric]:
        return _gpu_families()

    def collect(self) -> Iterable[Metric]:
        memory, total, utilisation = _gpu_families()
        cuda = self._torch.cuda
        gpu = str(self._index)
        memory.add_metric([gpu, "allocated"], float(cuda.memory_allocated(self._index)))
        memory.add_metric([gpu, "reserved"], float(cuda.memory_reserved(self._index)))
        memory.add_metric([gpu, "peak_allocated"], float(cuda.max_memory_allocated(self._index)))
        total.add_metric([gpu], float(cuda.get_device_properties(self._index).total_memory))
        families: list[Metric] = [memory, total]
        if self._handle is not None:
            try:
                rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
                used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
            except Exception as exc:  # NVML errors must not break the scrape
                logger.warning("NVML read failed: %s", exc)
            else:
                utilisation.add_metric([gpu], float(rates.gpu) / 100.0)
                memory.add_metric([gpu, "device_used"], float(used))
                families.append(utilisation)
        return families


def _gpu_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    return (
        GaugeMetricFamily(
            "spasemsr_gpu_memory_bytes",
            "GPU memory: torch allocated/reserved/peak_allocated; device_used from NVML.",
            labels=["gpu", "kind"],
        ),
        GaugeMetricFamily(
            "spasemsr_gpu_memory_total_bytes", "Total memory of the GPU.", labels=["gpu"]
        ),
        GaugeMetricFamily(
            "spasemsr_gpu_utilization_ratio",
            "Fraction of the last sample period the GPU was busy (NVML).",
            labels=["gpu"],
        ),
    )


def _device_index(device: str) -> int:
    _, _, index = device.partition(":")
    return int(index) if index else 0


def _open_nvml(torch: Any, index: int) -> tuple[Any, Any]:
    """NVML handle of the device torch calls ``index``.

    NVML numbers GPUs ignoring ``CUDA_VISIBLE_DEVICES``, so the device is found by its UUID.
    """
    try:
        import pynvml
    except ImportError:
        logger.info("nvidia-ml-py not installed: no GPU utilisation metric")
        return None, None
    try:
        pynvml.nvmlInit()
        uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", ""))
        if uuid:
            wanted = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
            return pynvml, pynvml.nvmlDeviceGetHandleByUUID(wanted)
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception as exc:
        logger.warning("NVML unavailable (%s): no GPU utilisation metric", exc)
        return None, None


_installed: WorkerMetrics | None = None
_install_lock = threading.Lock()


def install_metrics(metrics: WorkerMetrics) -> None:
    global _installed
    _installed = metrics


def current_metrics() -> WorkerMetrics:
    """The process's metrics (``worker.main`` installs the served one; otherwise a private one)."""
    global _installed
    with _install_lock:
        if _installed is None:
            _installed = WorkerMetrics()
        return _installed
