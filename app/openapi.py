"""The OpenAPI document as clients and code generators need it: named schemas, the
problem+json body of every error, and how to authenticate.

FastAPI derives most of it from the routes; this fills in what it cannot know: its name for the
upload form is ``Body_create_job_v1_jobs_post``, the JSON alternative of that upload is read by
a route of its own (``app.routes.NotFormRoute``, left out of the document) whose schema is only
referenced, error responses declared as problem+json carry no schema, and the API-key check is
a dependency of our own rather than a FastAPI security class.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.schemas import JobCreateJson

PROBLEM_MEDIA_TYPE = "application/problem+json"
SCHEMA_NAMES = {"Body_create_job_v1_jobs_post": "JobUpload"}
REFERENCED_SCHEMAS: tuple[type[BaseModel], ...] = (JobCreateJson,)
"""Request bodies declared in a route's ``openapi_extra``, which FastAPI does not collect."""

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "An error, as RFC 9457 problem details; never a stack trace.",
    "type": "object",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string", "format": "uri", "description": "What kind of error."},
        "title": {"type": "string", "description": "The kind, in words."},
        "status": {"type": "integer", "description": "The HTTP status."},
        "detail": {"type": "string", "description": "This occurrence, in words."},
        "instance": {"type": "string", "description": "The path the error is about."},
    },
    "additionalProperties": True,
    "example": {
        "type": "https://spasemsr.dev/problems/too-many-pixels",
        "title": "Image too large",
        "status": 413,
        "detail": "At scale 4 the output would be 70000000 pixels; the limit is 67108864.",
        "instance": "/v1/jobs",
    },
}

SECURITY_SCHEMES: dict[str, Any] = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "An API key as a bearer token."},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}


def install_openapi(app: FastAPI) -> None:
    """Replace ``app.openapi`` with one that completes FastAPI's document (built once)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            app.openapi_schema = complete(document)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def complete(document: dict[str, Any]) -> dict[str, Any]:
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for old, new in SCHEMA_NAMES.items():
        if old in schemas:
            schemas[new] = {**schemas.pop(old), "title": new}
    for model in REFERENCED_SCHEMAS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in schema.pop("$defs", {}).items():
            schemas.setdefault(name, definition)
        schemas[model.__name__] = schema
    schemas["Problem"] = PROBLEM_SCHEMA
    schemas.pop("HTTPValidationError", None)  # validation errors are problems too
    schemas.pop("ValidationError", None)
    components["securitySchemes"] = SECURITY_SCHEMES
    # Keys are optional unless the service requires them: {} lists "no key" as allowed.
    document["security"] = [{"bearer": []}, {"apiKey": []}, {}]
    renamed = {f"#/components/schemas/{old}": f"#/components/schemas/{new}"
               for old, new in SCHEMA_NAMES.items()}  # fmt: skip
    _rewrite(document, renamed)
    return document


def _rewrite(node: Any, renamed: dict[str, str]) -> None:
    """Point refs at the new names; give every error response the Problem schema."""
    if isinstance(node, dict):
        reference = node.get("$ref")
        if isinstance(reference, str) and reference in renamed:
            node["$ref"] = renamed[reference]
        responses = node.get("responses")
        if isinstance(responses, dict):
            for code, response in responses.items():
                if str(code)[:1] in {"4", "5"} and isinstance(response, dict):
                    response["content"] = {
                        PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}
                    }
        for value in node.values():
            _rewrite(value, renamed)
    elif isinstance(node, list):
        for value in node:
            _rewrite(value, renamed)


# The docs pages run the packaged Swagger UI / ReDoc (inline start-up scripts, ReDoc's blob:
# worker); nothing may load from another origin, not even ReDoc's branding image.
DOCS_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "worker-src 'self' blob:",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ]
)
DOCS_PATHS = frozenset({"/docs", "/redoc"})


class DocsPolicyMiddleware:
    """Adds the docs pages' Content-Security-Policy (pure ASGI: bodies pass untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in DOCS_PATHS:
            await self.app(scope, receive, send)
            return

        async def with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"content-security-policy", DOCS_POLICY.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_policy)
