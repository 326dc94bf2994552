"""The FastAPI application factory. ``python -m app.server`` serves it (with a deadline on
request heads); ``uvicorn --factory app.main:create_app`` works too, without that deadline."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from app.errors import install_error_handlers
from app.metrics import ApiMetrics, HttpMetricsMiddleware, metrics_endpoint
from app.openapi import DocsPolicyMiddleware, install_openapi
from app.replicate import router as replicate_router
from app.routes import router
from app.services import Services
from app.uploads import MULTIPART_SLACK_BYTES, UploadLimitMiddleware
from app.web import web_router
from core.limits import AuthFailures, IdempotencyKeys, RateLimiter
from core.queue import JobQueue
from core.records import JobStore
from core.redis_conn import connect_redis
from core.secrets_check import refuse_unusable_api_keys
from core.settings import Settings
from core.storage import build_storage
from core.workers import WorkerRegistry

logger = logging.getLogger(__name__)


def build_services(settings: Settings) -> Services:
    connection = connect_redis(settings)
    prefix = settings.redis.key_prefix
    return Services(
        settings=settings,
        redis=connection,
        storage=build_storage(settings),
        jobs=JobStore(connection, prefix=prefix, ttl_seconds=settings.worker.record_ttl_seconds),
        queue=JobQueue(connection, prefix=prefix),
        workers=WorkerRegistry(connection, prefix=prefix),
        limiter=RateLimiter(
            connection,
            prefix=prefix,
            per_minute=settings.api.rate_limit_per_minute,
            burst=settings.api.rate_limit_burst,
        ),
        idempotency=IdempotencyKeys(
            connection, prefix=prefix, ttl_seconds=settings.api.idempotency_ttl_seconds
        ),
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    # Before anything is built or bound: a placeholder key must never serve (exits 1).
    refuse_unusable_api_keys(settings.api)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = build_services(settings)
        app.state.services = services
        app.state.auth_failures = AuthFailures(
            services.redis,
            prefix=settings.redis.key_prefix,
            per_minute=settings.api.auth_failures_per_minute,
        )
        logger.info("API ready (storage: %s)", settings.storage.backend)
        try:
            yield
        finally:
            services.redis.close()

    # The docs pages' Swagger UI and ReDoc come from a package, not a CDN: /docs works on a
    # machine without internet.
    app = FastAPIOffline(
        title="SpaSemSR Serve",
        version="0.1.0",
        summary="Spatial-semantic guided diffusion super-resolution as a service.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(DocsPolicyMiddleware)
    app.include_router(router)
    app.include_router(replicate_router)  # Replicate's clients, over the same engine
    app.include_router(web_router)
    app.add_middleware(
        UploadLimitMiddleware,
        max_body_bytes=settings.api.max_upload_bytes + MULTIPART_SLACK_BYTES,
        idle_timeout_seconds=settings.api.upload_idle_timeout_seconds,
        deadline_seconds=settings.api.body_deadline_seconds,
    )
    # Prometheus (DESIGN 2.3): added last, so it is the outermost and times whole requests.
    app.state.metrics = metrics = ApiMetrics(lambda: getattr(app.state, "services", None))
    app.add_route("/metrics", metrics_endpoint, include_in_schema=False)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    return app
