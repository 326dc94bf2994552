"""The API's Prometheus metrics (DESIGN 2.3): HTTP requests, rejected uploads, and the queue.

Three kinds of series come from the API process:

- HTTP request metrics, counted by a pure ASGI middleware with bounded labels (the route
  template such as ``/v1/jobs/{job_id}``, never the raw path, so never a job id);
- ``spasemsr_uploads_rejected_total{reason}``, read from the problem ``type`` of the error
  answers to ``POST /v1/jobs`` -- every refusal, wherever it is raised (the streaming byte
  cap answers before any route runs), ends as a problem document, so this is the one place
  that sees them all;
- queue depth, age of the oldest queued job and workers by state, read from Redis at scrape
  time so that any number of API replicas agree with each other and with Redis.

Each application has its own ``CollectorRegistry`` (no process-global state): the API runs one
process per container or pod and scales by replicas, each one a scrape target.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.routing import Match

from app.errors import PROBLEM_MEDIA_TYPE, PROBLEM_TYPE_BASE
from app.services import Services
from app.uploads import ASGIApp, Message, Receive, Scope, Send
from core.errors import SpaSemSRError
from core.workers import WorkerState

logger = logging.getLogger(__name__)

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds; uploads of a few MiB over slow links take seconds, status polls milliseconds."""

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"
UPLOAD_ROUTE = ("POST", "/v1/jobs")
MAX_PROBLEM_BYTES = 64 * 1024


def _error_classes(root: type[SpaSemSRError]) -> Iterator[type[SpaSemSRError]]:
    yield root
    for sub in root.__subclasses__():
        yield from _error_classes(sub)


def rejection_reasons() -> frozenset[str]:
    """Every reason label value: one per typed error (a bounded set fixed by the code)."""
    return frozenset(
        {cls.type_name().replace("-", "_") for cls in _error_classes(SpaSemSRError)} | {"other"}
    )


def reason_for_problem_type(problem_type: object) -> str:
    reasons = rejection_reasons()
    if isinstance(problem_type, str) and problem_type.startswith(PROBLEM_TYPE_BASE):
        reason = problem_type.removeprefix(PROBLEM_TYPE_BASE).replace("-", "_")
        if reason in reasons:
            return reason
    return "other"


class ApiMetrics:
    """The API's registry and the instruments the middleware and the collector fill."""

    def __init__(self, services: Callable[[], Services | None]) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "spasemsr_http_requests",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "spasemsr_http_request_duration_seconds",
            "Time from the request's arrival to the end of its answer.",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=self.registry,
        )
        self.http_in_flight = Gauge(
            "spasemsr_http_requests_in_flight",
            "HTTP requests being handled now.",
            registry=self.registry,
        )
        self.uploads_rejected = Counter(
            "spasemsr_uploads_rejected",
            "Job submissions refused, by reason (the problem type of the answer).",
            ["reason"],
            registry=self.registry,
        )
        for reason in sorted(rejection_reasons()):
            self.uploads_rejected.labels(reason)
        self.registry.register(RedisStateCollector(services))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RedisStateCollector:
    """Queue depth, oldest job age and workers by state, read from Redis at scrape time.

    When Redis cannot be read, only ``spasemsr_redis_up 0`` is exported: absent queue series
    are honest, zeros would claim an empty queue.
    """

    def __init__(
        self, services: Callable[[], Services | None], *, now: Callable[[], float] = time.time
    ) -> None:
        self._services = services
        self._now = now

    def describe(self) -> Iterable[Metric]:
        return _families()

    def collect(self) -> Iterable[Metric]:
        up, depth, age, workers = _families()
        services = self._services()
        if services is None:  # scraped before the lifespan opened the connections
            up.add_metric([], 0.0)
            return [up]
        try:
            depths = services.queue.depths()
            oldest = services.queue.oldest_enqueued()
            live = services.workers.live()
        except (RedisError, ValidationError, ValueError) as exc:
            logger.warning("metrics: cannot read the queue state from Redis: %s", exc)
            up.add_metric([], 0.0)
            return [up]
        up.add_metric([], 1.0)
        now = self._now()
        for (model, priority), count in depths.items():
            labels = [priority.value, model.value]
            depth.add_metric(labels, float(count))
            head = oldest.get((model, priority))
            age.add_metric(labels, max(0.0, now - head.timestamp()) if head else 0.0)
        counts = {state: 0 for state in WorkerState}
        for worker in live:
            counts[worker.state] += 1
        for state, count in counts.items():
            workers.add_metric([state.value], float(count))
        return [up, depth, age, workers]


def _families() -> tuple[
    GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily
]:
    return (
        GaugeMetricFamily("spasemsr_redis_up", "1 when the API could read Redis at this scrape."),
        GaugeMetricFamily(
            "spasemsr_queue_depth",
            "Jobs waiting in each queue (one per priority and model).",
            labels=["queue", "model"],
        ),
        GaugeMetricFamily(
            "spasemsr_queue_oldest_age_seconds",
            "How long the job at the head of each queue has waited (0 when empty).",
            labels=["queue", "model"],
        ),
        GaugeMetricFamily(
            "spasemsr_workers", "Live workers by state (from their heartbeats).", labels=["state"]
        ),
    )


async def metrics_endpoint(request: Request) -> Response:
    """``GET /metrics``: the text exposition format. Redis is read off the event loop."""
    metrics: ApiMetrics = request.app.state.metrics
    body = await run_in_threadpool(metrics.render)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


class HttpMetricsMiddleware:
    """Counts and times every HTTP request; labels are the route template, never the path."""

    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"] if scope["method"] in KNOWN_METHODS else "OTHER"
        answer = _AnswerRecorder()

        async def recording_send(message: Message) -> None:
            answer.record(message)
            await send(message)

        began = time.perf_counter()
        self.metrics.http_in_flight.inc()
        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.http_in_flight.dec()
            route = route_template(scope)
            status = str(answer.status)
            self.metrics.http_requests.labels(method, route, status).inc()
            self.metrics.http_duration.labels(method, route).observe(time.perf_counter() - began)
            if (method, route) == UPLOAD_ROUTE and answer.status >= 400:
                self.metrics.uploads_rejected.labels(answer.problem_reason()).inc()


class _AnswerRecorder:
    """Keeps the status and, for problem documents, the (small) body of one answer."""

    def __init__(self) -> None:
        self.status = 500  # what the server sends when the app raised before answering
        self._problem = False
        self._body = bytearray()

    def record(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            self._problem = _content_type(message.get("headers", [])) == PROBLEM_MEDIA_TYPE
        elif (
            message["type"] == "http.response.body"
            and self._problem
            and len(self._body) < MAX_PROBLEM_BYTES
        ):
            self._body += message.get("body", b"")

    def problem_reason(self) -> str:
        if not self._problem:
            return "other"
        try:
            document: Any = json.loads(bytes(self._body))
        except ValueError:
            return "other"
        return reason_for_problem_type(document.get("type") if isinstance(document, dict) else None)


def _content_type(headers: Iterable[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.decode("latin-1").split(";")[0].strip()
    return ""


def route_template(scope: Mapping[str, Any]) -> str:
    """The template of the route that served the request (``/v1/jobs/{job_id}``).

    Requests answered before routing (the streaming upload cap) are matched here against the
    application's routes; anything that matches none is ``unmatched``.
    """
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    router = getattr(scope.get("app"), "router", None)
    full, partial = _match_routes(getattr(router, "routes", ()), dict(scope), prefix="")
    return full or partial or UNMATCHED_ROUTE


def _match_routes(
    routes: Iterable[Any], scope: dict[str, Any], *, prefix: str
) -> tuple[str | None, str | None]:
    """(full match, partial match) among routes; walks FastAPI's included routers too."""
    partial: str | None = None
    for candidate in routes:
        nested = getattr(candidate, "original_router", None)
        if nested is not None:  # an ``include_router`` branch: match inside it
            context = getattr(candidate, "include_context", None)
            segment = str(getattr(context, "prefix", "") or "")
            path = str(scope.get("path", ""))
            if not path.startswith(segment):
                continue
            stripped = {**scope, "path": path[len(segment) :]}
            full, maybe = _match_routes(nested.routes, stripped, prefix=prefix + segment)
            if full:
                return full, None
            partial = partial or maybe
            continue
        template = getattr(candidate, "path", None)
        if not isinstance(template, str):
            continue
        match, _ = candidate.matches(scope)
        if match is Match.FULL:
            return prefix + template, None
        if match is Match.PARTIAL:
            partial = partial or prefix + template
    return None, partial
