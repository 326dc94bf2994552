"""Replicate-compatible routes, so that Replicate's official clients work against this service.

They are a second HTTP shape over the same engine: a prediction is a job (one record, one
queue, the same limits, keys, idempotency and webhooks), created through
``app.routes.job_submission`` exactly as ``POST /v1/jobs`` creates one; only the request and
answer are shaped as Replicate's (``core.predictions``). Webhooks follow Replicate's
``webhook_events_filter`` (``start``, ``output``, ``logs``, ``completed``; all of them when it is
absent), each delivery carrying the prediction object (``worker.webhooks``).
"""

from __future__ import annotations

import contextlib
import json
from functools import partial
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile as StarletteUpload

from app.routes import (
    PROBLEM,
    base_url,
    cancel_as,
    file_store,
    job_fields,
    job_submission,
    referenced_image,
    validated,
    visible_job,
)
from app.schemas import JobCreate
from app.security import Principal, PrincipalDep, RateLimitDep
from app.services import Services, ServicesDep
from app.waiting import requested_wait, wait_for_end
from core.errors import InvalidParameters, JobAlreadyFinished, JobNotFound, UploadTooLarge
from core.files import StoredFile
from core.jobs import WEBHOOK_EVENTS, JobRecord, WebhookEvent
from core.models import ModelName
from core.owned import Cursor, OwnedJobs
from core.predictions import OWNER, prediction, version_id

router = APIRouter(tags=["replicate"])

PAGE_SIZE = 100
# Fields of the job form that the route itself decides: the model from the path or version,
# the webhook from the body's ``webhook``.
_NOT_INPUTS = frozenset({"model", "webhook_url"})
_INPUTS = frozenset(JobCreate.model_fields) - _NOT_INPUTS
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: PROBLEM for code in (401, 403, 404, 409, 413, 422, 429, 503)
}


class ModelNotFound(JobNotFound):
    title = "Model not found"


class PredictionCreate(BaseModel):
    # Unknown top-level fields (``stream``, future ones) are ignored as Replicate does; the
    # ``input`` object is checked field by field.
    model_config = ConfigDict(extra="ignore")

    version: str | None = Field(default=None, max_length=200)
    input: dict[str, Any] = Field(default_factory=dict)
    webhook: str | None = Field(default=None, max_length=2048)
    webhook_completed: str | None = Field(default=None, max_length=2048)
    webhook_events_filter: list[WebhookEvent] | None = Field(default=None, max_length=16)


def _model_named(owner: str, name: str) -> ModelName:
    if owner == OWNER:
        for model in ModelName:
            if model.value == name:
                return model
    raise ModelNotFound(f"No model {owner}/{name}; models are {OWNER}/<name> (GET /v1/models).")


def _model_of_version(version: str | None) -> ModelName:
    """``spasemsr/<model>``, ``spasemsr/<model>:<id>`` or the bare version id."""
    if not version:
        raise InvalidParameters("version: give 'spasemsr/<model>' or a version id.")
    reference, _, wanted = version.partition(":")
    if "/" in reference:
        owner, _, name = reference.partition("/")
        model = _model_named(owner, name)
        if wanted and wanted != version_id(model):
            raise ModelNotFound(f"No version {wanted!r} of {reference}.")
        return model
    for model in ModelName:
        if version_id(model) == version:
            return model
    raise ModelNotFound(f"No model version {version!r}.")


def _owned(services: Services) -> OwnedJobs:
    settings = services.settings
    return OwnedJobs(
        services.redis,
        prefix=settings.redis.key_prefix,
        ttl_seconds=settings.worker.record_ttl_seconds,
    )


def _job_form(inputs: dict[str, Any], model: ModelName) -> JobCreate:
    """The prediction's ``input`` (less ``image``) as the job form, strictly: a misspelt
    parameter is an error, as on ``POST /v1/jobs``."""
    fields = job_fields(inputs, allowed=_INPUTS, what="input field")
    return validated(JobCreate, {**fields, "model": model}, where="input.")


def _webhook(body: PredictionCreate) -> tuple[str | None, tuple[WebhookEvent, ...]]:
    """The webhook URL and the events it gets: the filter's, else all of them (Replicate's
    default); the legacy ``webhook_completed`` gets the end only. No events: no webhook."""
    if body.webhook:
        wanted = body.webhook_events_filter
        events = tuple(e for e in WEBHOOK_EVENTS if wanted is None or e in wanted)
        return (body.webhook if events else None), events
    if body.webhook_completed:
        return body.webhook_completed, ("completed",)
    return None, ()


def _shown_input(inputs: dict[str, Any]) -> dict[str, Any]:
    """The input as the client sent it, less a data: URI's bytes (kept out of Redis)."""
    image = inputs.get("image")
    if isinstance(image, str) and image.startswith("data:"):
        return {**inputs, "image": image.split(",", 1)[0] + ",…"}
    return inputs


def _prediction(
    record: JobRecord, note: dict[str, Any], base: str, services: Services
) -> dict[str, Any]:
    return prediction(record, note, base=base, storage=services.storage,
                      settings=services.settings)  # fmt: skip


async def _create(
    request: Request,
    services: Services,
    principal: Principal,
    model: ModelName,
    body: PredictionCreate,
    *,
    prefer: str | None,
    idempotency_key: str | None,
) -> Response:
    inputs = dict(body.input)
    image = inputs.pop("image", None)
    form = _job_form(inputs, model)
    data = await referenced_image(image, request, services, principal)
    webhook_url, events = _webhook(body)
    submission = job_submission(
        form,
        data,
        principal,
        idempotency_key=idempotency_key,
        webhook_url=webhook_url,
        webhook_events=events,
        api_url=base_url(request, services),
    )
    accepted = await run_in_threadpool(services.submissions.submit, submission)
    record = accepted.record
    owned = _owned(services)
    note = {"input": _shown_input(body.input), "version": body.version or version_id(model)}
    if not accepted.replayed:
        created = record.created_at.timestamp()
        await run_in_threadpool(owned.add, principal.name, record.id, created, note)
    else:
        note = await run_in_threadpool(owned.note, record.id)
    wait = requested_wait(prefer, max_seconds=services.settings.api.max_prefer_wait_seconds)
    if wait is not None:
        record = await wait_for_end(services.jobs, record.id, wait)
    shown = _prediction(record, note, base_url(request, services), services)
    headers = {"Location": shown["urls"]["get"]}
    if accepted.replayed:
        headers["Idempotent-Replayed"] = "true"
    return _json(shown, status.HTTP_201_CREATED, headers)


def _json(
    content: dict[str, Any], code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(json.dumps(content), code, headers, media_type="application/json")


PreferHeader = Annotated[
    str | None,
    Header(description="`wait` or `wait=N`: answer once the prediction ends (bounded)."),
]
IdempotencyHeader = Annotated[str | None, Header(max_length=255)]


@router.post(
    "/v1/models/{owner}/{name}/predictions",
    status_code=status.HTTP_201_CREATED,
    responses=_ERRORS,
    dependencies=[RateLimitDep],
    summary="Replicate: create a prediction of a model",
)
async def create_model_prediction(
    owner: str,
    name: str,
    body: PredictionCreate,
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    prefer: PreferHeader = None,
    idempotency_key: IdempotencyHeader = None,
) -> Response:
    model = _model_named(owner, name)
    return await _create(request, services, principal, model, body,
                         prefer=prefer, idempotency_key=idempotency_key)  # fmt: skip


@router.post(
    "/v1/predictions",
    status_code=status.HTTP_201_CREATED,
    responses=_ERRORS,
    dependencies=[RateLimitDep],
    summary="Replicate: create a prediction of a model version",
)
async def create_prediction(
    body: PredictionCreate,
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    prefer: PreferHeader = None,
    idempotency_key: IdempotencyHeader = None,
) -> Response:
    model = _model_of_version(body.version)
    return await _create(request, services, principal, model, body,
                         prefer=prefer, idempotency_key=idempotency_key)  # fmt: skip


def _shown(record: JobRecord, request: Request, services: Services) -> dict[str, Any]:
    return _prediction(record, _owned(services).note(record.id), base_url(request, services),
                       services)  # fmt: skip


@router.get(
    "/v1/predictions/{prediction_id}",
    responses=_ERRORS,
    summary="Replicate: a prediction",
)
def get_prediction(
    prediction_id: str, request: Request, services: ServicesDep, principal: PrincipalDep
) -> Response:
    record = visible_job(prediction_id, services, principal)
    return _json(_shown(record, request, services))


@router.post(
    "/v1/predictions/{prediction_id}/cancel",
    responses=_ERRORS,
    summary="Replicate: cancel a prediction (an ended one is returned as it is)",
)
def cancel_prediction(
    prediction_id: str, request: Request, services: ServicesDep, principal: PrincipalDep
) -> Response:
    # Replicate answers the cancel of an ended prediction with the prediction as it is.
    with contextlib.suppress(JobAlreadyFinished):
        cancel_as(prediction_id, services, principal, base_url(request, services))
    return _json(_shown(services.jobs.get(prediction_id), request, services))


@router.get(
    "/v1/predictions",
    responses=_ERRORS,
    summary="Replicate: the caller's predictions, newest first",
)
def list_predictions(
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    owned = _owned(services)
    after = Cursor.decode(cursor) if cursor else None
    if cursor and after is None:
        raise InvalidParameters("cursor: not a cursor this service gave.")
    records, last = owned.records(services.jobs, principal.name, after=after, limit=PAGE_SIZE)
    results = [_shown(record, request, services) for record in records]
    following = None
    if last is not None:
        query = urlencode({"cursor": last.encode()})
        following = f"{base_url(request, services)}/v1/predictions?{query}"
    return _json({"previous": None, "next": following, "results": results})


def _openapi_schema() -> dict[str, Any]:
    """The inputs of a prediction, from the job form's own JSON schema (not a copy)."""
    schema = JobCreate.model_json_schema(ref_template="#/components/schemas/{model}")
    definitions = schema.pop("$defs", {})
    properties = {
        name: field for name, field in schema["properties"].items() if name not in _NOT_INPUTS
    }
    image = {
        "type": "string",
        "format": "uri",
        "title": "Image",
        "description": "PNG, JPEG or WebP: a /v1/files URL or id, a data: URI or an http(s) URL.",
    }
    for order, field in enumerate([image, *properties.values()]):
        field["x-order"] = order
    return {
        "openapi": "3.0.2",
        "info": {"title": "SpaSemSR Serve", "version": "0.1.0"},
        "paths": {},
        "components": {
            "schemas": {
                **definitions,
                "Input": {
                    "type": "object",
                    "title": "Input",
                    "required": ["image"],
                    "properties": {"image": image, **properties},
                },
                "Output": {"type": "string", "format": "uri", "title": "Output"},
            }
        },
    }


@router.get(
    "/v1/models/{owner}/{name}",
    responses=_ERRORS,
    summary="Replicate: a model, with its inputs' schema",
)
def get_replicate_model(
    owner: str, name: str, request: Request, services: ServicesDep, principal: PrincipalDep
) -> Response:
    model = _model_named(owner, name)
    base = base_url(request, services)
    return _json(
        {
            "url": f"{base}/v1/models/{OWNER}/{model.value}",
            "owner": OWNER,
            "name": model.value,
            "description": f"{model.value} super-resolution, served by SpaSemSR Serve.",
            "visibility": "public",
            "github_url": None,
            "paper_url": None,
            "license_url": None,
            "run_count": 0,
            "cover_image_url": None,
            "default_example": None,
            "latest_version": {
                "id": version_id(model),
                "created_at": "2026-01-01T00:00:00+00:00",
                "cog_version": "0.9.0",
                "openapi_schema": _openapi_schema(),
            },
        }
    )


def _file_json(stored: StoredFile, base: str) -> dict[str, Any]:
    return {
        "id": stored.id,
        "name": stored.name,
        "content_type": stored.content_type,
        "size": stored.size,
        "etag": stored.sha256,
        "checksums": {"sha256": stored.sha256},
        "metadata": stored.metadata,
        "created_at": stored.created_at.isoformat(),
        "expires_at": stored.expires_at.isoformat(),
        "urls": {"get": f"{base}/v1/files/{stored.id}/download"},
    }


def _metadata(raw: str | None) -> dict[str, Any]:
    if raw is not None and len(raw) > 4096:
        raise InvalidParameters("metadata: longer than 4096 characters.")
    try:
        found = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise InvalidParameters("metadata: not JSON.") from exc
    if not isinstance(found, dict):
        raise InvalidParameters("metadata: give a JSON object.")
    return found


_FILE_FORM: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["content"],
                    "properties": {
                        "content": {"type": "string", "format": "binary"},
                        "metadata": {"type": "string", "description": "A JSON object."},
                    },
                }
            }
        },
    }
}
"""Declared by hand: the form is read in the route (a generated ``Body_...`` schema would be
an unnamed one in the OpenAPI document)."""


@router.post(
    "/v1/files",
    status_code=status.HTTP_201_CREATED,
    responses=_ERRORS,
    dependencies=[RateLimitDep],
    openapi_extra=_FILE_FORM,
    summary="Replicate: upload a file to use as an input",
)
async def create_file(request: Request, services: ServicesDep, principal: PrincipalDep) -> Response:
    form = await request.form()
    content = form.get("content")
    if not isinstance(content, StarletteUpload) or len(form.getlist("content")) != 1:
        raise InvalidParameters("Send exactly one 'content' file part.")
    metadata = form.get("metadata")
    max_bytes = services.settings.api.max_upload_bytes
    data = await content.read(max_bytes + 1)  # the middleware capped the body already
    if len(data) > max_bytes:
        raise UploadTooLarge(f"The file is larger than the limit of {max_bytes} bytes.")
    stored = await run_in_threadpool(
        partial(
            file_store(services).create,
            data,
            name=content.filename or "file",
            content_type=content.content_type or "application/octet-stream",
            owner=principal.name,
            metadata=_metadata(metadata if isinstance(metadata, str) else None),
        )
    )
    return _json(_file_json(stored, base_url(request, services)), status.HTTP_201_CREATED)


@router.get("/v1/files/{file_id}", responses=_ERRORS, summary="Replicate: a file's metadata")
def get_file(
    file_id: str, request: Request, services: ServicesDep, principal: PrincipalDep
) -> Response:
    stored = file_store(services).get(file_id, owner=principal.name, admin=principal.admin)
    return _json(_file_json(stored, base_url(request, services)))


@router.get(
    "/v1/files/{file_id}/download",
    responses=_ERRORS,
    response_class=Response,
    summary="Replicate: a file's bytes",
)
def download_file(file_id: str, services: ServicesDep, principal: PrincipalDep) -> Response:
    files = file_store(services)
    stored = files.get(file_id, owner=principal.name, admin=principal.admin)
    return Response(files.read(stored), media_type=stored.content_type)
