"""The one place where errors become HTTP responses: RFC 9457 ``application/problem+json``."""

from __future__ import annotations

import logging
from http import HTTPMethod, HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from core import errors

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://spasemsr.dev/problems/"

# Most specific class first: the first match wins.
STATUS_BY_ERROR: tuple[tuple[type[errors.SpaSemSRError], HTTPStatus], ...] = (
    (errors.UploadTooLarge, HTTPStatus.REQUEST_ENTITY_TOO_LARGE),
    (errors.TooManyPixels, HTTPStatus.REQUEST_ENTITY_TOO_LARGE),
    (errors.UploadTimeout, HTTPStatus.REQUEST_TIMEOUT),
    (errors.UnsupportedImage, HTTPStatus.UNSUPPORTED_MEDIA_TYPE),
    (errors.CorruptImage, HTTPStatus.UNPROCESSABLE_ENTITY),
    (errors.InvalidParameters, HTTPStatus.UNPROCESSABLE_ENTITY),
    (errors.ModelNotServed, HTTPStatus.UNPROCESSABLE_ENTITY),
    (errors.JobNotFound, HTTPStatus.NOT_FOUND),
    (errors.JobNotFinished, HTTPStatus.CONFLICT),
    (errors.ResultGone, HTTPStatus.GONE),
    (errors.JobAlreadyFinished, HTTPStatus.CONFLICT),
    (errors.Unauthorized, HTTPStatus.UNAUTHORIZED),
    (errors.Forbidden, HTTPStatus.FORBIDDEN),
    (errors.IdempotencyKeyInUse, HTTPStatus.CONFLICT),
    (errors.IdempotencyKeyMismatch, HTTPStatus.UNPROCESSABLE_ENTITY),
    (errors.ClientError, HTTPStatus.BAD_REQUEST),
    (errors.Overloaded, HTTPStatus.TOO_MANY_REQUESTS),
    (errors.DependencyUnavailable, HTTPStatus.SERVICE_UNAVAILABLE),
)


def status_for(error: errors.SpaSemSRError) -> HTTPStatus:
    for error_class, status in STATUS_BY_ERROR:
        if isinstance(error, error_class):
            return status
    return HTTPStatus.INTERNAL_SERVER_ERROR


def problem_response(
    status: HTTPStatus,
    *,
    type_name: str,
    title: str,
    detail: str,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + type_name,
        "title": title,
        "status": int(status),
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update(extensions)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def problem_for(error: errors.SpaSemSRError, instance: str | None = None) -> JSONResponse:
    status = status_for(error)
    headers = None
    if isinstance(error, errors.Overloaded | errors.DependencyUnavailable):
        headers = {"Retry-After": str(error.retry_after_seconds)}
    elif isinstance(error, errors.Unauthorized):
        headers = {"WWW-Authenticate": 'Bearer realm="spasemsr"'}
    extensions: dict[str, Any] = {}
    if isinstance(error, errors.ModelNotServed):
        extensions["served"] = error.served
    detail = error.detail
    if status >= HTTPStatus.INTERNAL_SERVER_ERROR and not isinstance(
        error, errors.DependencyUnavailable
    ):
        detail = "The server could not complete the request."
    return problem_response(
        status,
        type_name=error.type_name(),
        title=error.title,
        detail=detail,
        instance=instance,
        headers=headers,
        **extensions,
    )


# What a route looks at to match a request; the framework's own per-request state stays out.
_PROBE_KEYS = ("type", "http_version", "scheme", "server", "path", "raw_path", "headers")


def allowed_methods(request: Request) -> list[str]:
    """Every method that some route of the app answers at the request's path.

    The router stops at the first route whose path matches, so its own 405 names only that
    route's methods (``GET`` for ``/v1/jobs/{id}``, which ``DELETE`` serves too). Each method
    is tried against every route instead, through the routes' public ``matches``.
    """
    base = {key: request.scope[key] for key in _PROBE_KEYS if key in request.scope}
    base["root_path"] = request.scope.get("app_root_path", request.scope.get("root_path", ""))
    routes = request.app.router.routes
    return [
        method.value
        for method in HTTPMethod
        if any(route.matches({**base, "method": method.value})[0] is Match.FULL for route in routes)
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.SpaSemSRError)
    async def _typed(request: Request, exc: errors.SpaSemSRError) -> JSONResponse:
        return problem_for(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {
                "loc": [str(part) for part in e.get("loc", ())],
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in exc.errors()
        ]
        summary = "; ".join(
            f"{'.'.join(p['loc'][1:]) or p['loc'][0]}: {p['msg']}" for p in problems
        )
        return problem_response(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            type_name=errors.InvalidParameters.type_name(),
            title=errors.InvalidParameters.title,
            detail=summary or "The request parameters are invalid.",
            instance=request.url.path,
            errors=problems,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = HTTPStatus(exc.status_code)
        headers = dict(exc.headers) if exc.headers else {}
        if status is HTTPStatus.METHOD_NOT_ALLOWED and (allowed := allowed_methods(request)):
            headers["Allow"] = ", ".join(allowed)
        return problem_response(
            status,
            type_name=status.phrase.lower().replace(" ", "-"),
            title=status.phrase,
            detail=str(exc.detail) if exc.detail else status.description,
            instance=request.url.path,
            headers=headers or None,
        )

    @app.exception_handler(RedisError)
    async def _redis(request: Request, exc: RedisError) -> JSONResponse:
        logger.warning("redis error on %s: %s", request.url.path, exc)
        return problem_for(
            errors.QueueUnavailable("The job queue cannot be reached."), request.url.path
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return problem_response(
            HTTPStatus.INTERNAL_SERVER_ERROR,
            type_name="internal-error",
            title="Internal error",
            detail="The server could not complete the request.",
            instance=request.url.path,
        )
