"""The v1 routes: a thin HTTP layer over the job store, the queue and object storage."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from functools import partial
from typing import Annotated, Any, TypeVar
from urllib.parse import urlencode, urlsplit

from fastapi import (
    APIRouter,
    Depends,
    File,
    Form,
    Header,
    Query,
    Request,
    Response,
    UploadFile,
    status,
)
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import Scope

from app.errors import problem_response
from app.schemas import (
    HealthPublic,
    JobCreate,
    JobCreateJson,
    JobLinks,
    JobList,
    JobPublic,
    ModelList,
    ModelPublic,
)
from app.security import Principal, PrincipalDep, RateLimitDep, ensure_access
from app.services import Services, ServicesDep
from app.waiting import requested_wait, wait_for_end
from core.errors import (
    ClientError,
    DependencyUnavailable,
    InputMissing,
    InvalidParameters,
    JobAlreadyFinished,
    JobNotFinished,
    ResultGone,
    StorageUnavailable,
)
from core.files import FileStore
from core.inputs import InputContext, image_bytes
from core.jobs import JobParameters, JobRecord, JobStatus, WebhookEvent, utcnow
from core.models import ModelName, default_model
from core.owned import Cursor, OwnedJobs
from core.recovery import expire_if_stale
from core.submission import Submission

logger = logging.getLogger(__name__)

router = APIRouter()

PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}
M = TypeVar("M", bound=BaseModel)


def base_url(request: Request, services: ServicesDep) -> str:
    """Where clients reach this API: the configured public URL (behind a proxy), else the
    URL this request came to."""
    configured = services.settings.api.public_url
    return (configured or str(request.base_url)).rstrip("/")


BaseUrlDep = Annotated[str, Depends(base_url)]


def _links(job_id: str, base: str) -> JobLinks:
    return JobLinks(self=f"{base}/v1/jobs/{job_id}", result=f"{base}/v1/jobs/{job_id}/result")


def untrained_warning(model: str) -> str:
    return (
        f"The {model} weights are untrained (seeded random initialisation): results show the "
        "pipeline working, not the model's quality."
    )


def _job_warnings(record: JobRecord, grounding: dict[str, Any] | None) -> list[str]:
    warnings = []
    if record.model_trained is False and record.model is not None:
        warnings.append(untrained_warning(record.model.value))
    if grounding is not None and grounding.get("trained") is False:
        warnings.append(
            "The grounding (tags, boxes) came from untrained models: it is not a description "
            "of the image."
        )
    return warnings


def _public(record: JobRecord, services: Services, base: str) -> JobPublic:
    return _view(record, services.submissions.position(record), base)


def _view(record: JobRecord, position: int | None, base: str) -> JobPublic:
    found = record.details.get("grounding")
    grounding = found if isinstance(found, dict) else None
    return JobPublic(
        id=record.id,
        status=record.status,
        model=record.model,
        model_trained=record.model_trained,
        warnings=_job_warnings(record, grounding),
        priority=record.priority,
        queue_position=position,
        progress=record.progress,
        parameters=record.parameters,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        timings=record.timings,
        input=record.input,
        output=record.output,
        error=record.error,
        grounding=grounding,
        links=_links(record.id, base),
    )


class MalformedJson(ClientError):
    title = "Malformed JSON"


FORM_MEDIA_TYPES = frozenset({"multipart/form-data", "application/x-www-form-urlencoded"})
JSON_MEDIA_TYPE = "application/json"


def media_type(headers: Headers) -> str:
    """The body's media type, without its parameters (``charset``, ``boundary``)."""
    return headers.get("content-type", "").partition(";")[0].strip().lower()


class NotFormRoute(APIRoute):
    """``POST /v1/jobs`` with any body but a form.

    The form route keeps FastAPI's multipart parsing (the ``image`` part, the ``JobCreate``
    fields); this route, tried first, steps aside for form bodies and takes every other one:
    JSON, and a 415 for the rest. The OpenAPI document shows the two as one operation with two
    request content types (``openapi_extra`` of the form route).
    """

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE and media_type(Headers(scope=scope)) in FORM_MEDIA_TYPES:
            return Match.NONE, {}
        return match, child_scope


IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        max_length=255,
        description="Repeat a request safely: the same key returns the same job.",
    ),
]
PreferHeader = Annotated[
    str | None,
    Header(
        max_length=255,
        description="`wait` or `wait=N`: answer when the job has ended (200), or after N "
        "seconds at most (bounded by the service) with the job as it stands (202).",
    ),
]
_JOB_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: PROBLEM for code in (400, 401, 409, 413, 415, 422, 429, 503)
}
_JSON_BODY: dict[str, Any] = {
    "requestBody": {
        "content": {JSON_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/JobCreateJson"}}}
    }
}
"""The JSON alternative, added to the form route's generated request body (the schema is
added to the components by ``app.openapi``)."""


async def create_job_from_json(
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    response: Response,
    base: BaseUrlDep,
    idempotency_key: IdempotencyKeyHeader = None,
    prefer: PreferHeader = None,
) -> JobPublic:
    """The image by reference (``core.inputs``: a data: URI, one of our files, an external
    URL fetched under the SSRF rules), the parameters as the form's, checked first."""
    if media_type(request.headers) != JSON_MEDIA_TYPE:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            "Send the job as multipart/form-data (an 'image' file part and form fields) or "
            "as application/json.",
        )
    fields = job_fields(await _json_object(request), allowed=JSON_FIELDS, what="field")
    form = validated(JobCreateJson, fields)
    data = await referenced_image(form.image, request, services, principal)
    submission = job_submission(form, data, principal, idempotency_key=idempotency_key)
    return await _accept(submission, services, response, base, prefer)


# Registered before the form route, so that it is tried first.
router.add_api_route(
    "/v1/jobs",
    create_job_from_json,
    methods=["POST"],
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    dependencies=[RateLimitDep],
    include_in_schema=False,  # documented with the form route: one operation
    route_class_override=NotFormRoute,
)


@router.post(
    "/v1/jobs",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    responses=_JOB_RESPONSES,
    dependencies=[RateLimitDep],
    openapi_extra=_JSON_BODY,
    summary="Upload an image (or give it by URL, as JSON) and queue an upscaling job",
)
async def create_job(
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    image: Annotated[UploadFile, File(description="PNG, JPEG or WebP image.")],
    form: Annotated[JobCreate, Form()],
    response: Response,
    base: BaseUrlDep,
    idempotency_key: IdempotencyKeyHeader = None,
    prefer: PreferHeader = None,
) -> JobPublic:
    """Parse, then delegate: the submission service checks, admits, stores and queues the job
    in one worker thread, as all of it blocks (Redis, storage, decoding, webhook DNS)."""
    await _refuse_unknown_fields(request)
    data = await _read_upload(image, services.settings.api.max_upload_bytes)
    submission = job_submission(form, data, principal, idempotency_key=idempotency_key)
    return await _accept(submission, services, response, base, prefer)


async def _accept(
    submission: Submission,
    services: Services,
    response: Response,
    base: str,
    prefer: str | None,
) -> JobPublic:
    accepted = await run_in_threadpool(services.submissions.submit, submission)
    response.headers["Location"] = f"{base}/v1/jobs/{accepted.record.id}"
    if accepted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    wait = requested_wait(prefer, max_seconds=services.settings.api.max_prefer_wait_seconds)
    if wait is None:
        return _view(accepted.record, accepted.position, base)
    response.headers["Preference-Applied"] = f"wait={wait:g}"
    record = await wait_for_end(services.jobs, accepted.record.id, wait)
    if record.status.is_terminal:
        response.status_code = status.HTTP_200_OK
    return await run_in_threadpool(_public, record, services, base)


def job_submission(
    form: JobCreate,
    data: bytes,
    principal: Principal,
    *,
    idempotency_key: str | None,
    webhook_url: str | None = None,
    webhook_events: tuple[WebhookEvent, ...] | None = None,
    api_url: str | None = None,
) -> Submission:
    """One job as both HTTP shapes (``/v1/jobs``, Replicate's predictions) hand it to the
    submission service; the webhook is the form's unless the caller gives its own."""
    return Submission(
        data=data,
        model=form.model,
        parameters_for=partial(form_parameters, form),
        priority=form.priority,
        webhook_url=webhook_url or form.webhook_url,
        webhook_events=webhook_events,
        api_url=api_url,
        client=principal.name,
        owner=principal.name if principal.authenticated else None,
        idempotency_key=idempotency_key,
    )


FORM_FIELDS = frozenset(JobCreate.model_fields) | {"image"}
JSON_FIELDS = frozenset(JobCreateJson.model_fields)


async def _refuse_unknown_fields(request: Request) -> None:
    """A misspelt parameter must not be silently ignored (``stpes=50`` is an error)."""
    form = await request.form()  # already parsed by FastAPI: this reads its cache
    job_fields(form, allowed=FORM_FIELDS, what="form field")
    if len(form.getlist("image")) != 1:
        raise InvalidParameters("Send exactly one 'image' file part.")


def job_fields(fields: Mapping[str, Any], *, allowed: Iterable[str], what: str) -> dict[str, Any]:
    """The request's fields, every one of them known: a misspelt parameter is an error, never
    ignored. A Replicate-style list of tags becomes the form's comma-separated text."""
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise InvalidParameters(f"Unknown {what}(s): {', '.join(unknown)}.")
    found = dict(fields)
    if isinstance(found.get("tags"), list):
        found["tags"] = ",".join(str(tag) for tag in found["tags"])
    return found


def validated(schema: type[M], fields: Mapping[str, Any], where: str = "") -> M:
    """``schema`` from the fields, or the first problem as ``InvalidParameters``."""
    try:
        return schema.model_validate(fields)
    except ValidationError as exc:
        raise InvalidParameters(f"{where}{first_message(exc)}") from exc


_JSON_ERRORS = (ValueError, RecursionError)
"""``json.loads`` refuses bad syntax and encodings with ``ValueError``, and nesting deeper
than the interpreter's stack with ``RecursionError``: both are the client's fault."""


async def _json_object(request: Request) -> dict[str, Any]:
    """The body (capped by the upload middleware) as a JSON object."""
    try:
        body = json.loads(await request.body())
    except _JSON_ERRORS as exc:
        raise MalformedJson("The request body is not valid JSON.") from exc
    if not isinstance(body, dict):
        raise InvalidParameters('Send a JSON object: {"image": ..., "scale": ...}.')
    return body


def file_store(services: Services) -> FileStore:
    settings = services.settings
    return FileStore(
        services.redis,
        services.storage,
        prefix=settings.redis.key_prefix,
        ttl_seconds=settings.api.file_ttl_seconds,
        max_bytes=settings.api.max_upload_bytes,
    )


def own_hosts(request: Request, services: Services) -> frozenset[str]:
    """``host[:port]`` under which clients reach this service (its file URLs point there)."""
    hosts = {request.url.netloc.lower()}
    if services.settings.api.public_url:
        hosts.add(urlsplit(services.settings.api.public_url).netloc.lower())
    return frozenset(hosts)


async def referenced_image(
    value: object, request: Request, services: Services, principal: Principal
) -> bytes:
    """The bytes of an image given by reference; in the thread pool, as resolving it blocks
    (Redis and storage for our own files, DNS and HTTP for an external URL)."""
    context = InputContext(
        files=file_store(services),
        owner=principal.name,
        admin=principal.admin,
        own_hosts=own_hosts(request, services),
        max_bytes=services.settings.api.max_upload_bytes,
        allow_networks=services.settings.webhooks.allow_networks,
        timeout_seconds=services.settings.webhooks.timeout_seconds,
    )
    return await run_in_threadpool(image_bytes, value, context)


async def _read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    """The file part's bytes, at most one past the cap: enough for the service to refuse them
    (the body is in already, held by the form parser, and the middleware capped it)."""
    return await upload.read(max_bytes + 1)


def form_parameters(form: JobCreate, model: ModelName) -> JobParameters:
    try:
        return form.parameters(model)
    except ValidationError as exc:
        raise InvalidParameters(first_message(exc)) from exc


def first_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))


JOBS_PAGE_SIZE = 50


@router.get(
    "/v1/jobs",
    response_model=JobList,
    responses={401: PROBLEM, 422: PROBLEM, 503: PROBLEM},
    summary="The caller's jobs, newest first (cursor pagination)",
)
def list_jobs(
    services: ServicesDep,
    principal: PrincipalDep,
    base: BaseUrlDep,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=JOBS_PAGE_SIZE)] = JOBS_PAGE_SIZE,
) -> JobList:
    after = Cursor.decode(cursor) if cursor else None
    if cursor and after is None:
        raise InvalidParameters("cursor: not a cursor this service gave.")
    owned = OwnedJobs(
        services.redis,
        prefix=services.settings.redis.key_prefix,
        ttl_seconds=services.settings.worker.record_ttl_seconds,
    )
    records, last = owned.records(services.jobs, principal.name, after=after, limit=limit)
    following = None
    if last is not None:
        following = f"{base}/v1/jobs?{urlencode({'cursor': last.encode(), 'limit': limit})}"
    return JobList(jobs=[_public(r, services, base) for r in records], next=following)


@router.get(
    "/v1/jobs/{job_id}",
    response_model=JobPublic,
    responses={401: PROBLEM, 403: PROBLEM, 404: PROBLEM, 503: PROBLEM},
    summary="Status, progress and timings of a job",
)
def get_job(
    job_id: str, services: ServicesDep, principal: PrincipalDep, base: BaseUrlDep
) -> JobPublic:
    return _public(visible_job(job_id, services, principal), services, base)


def visible_job(job_id: str, services: Services, principal: Principal) -> JobRecord:
    """The job as its owner may see it now: a queued job past its time-to-live is ended
    (``queue-timeout``) when it is read, not left queued until a worker gets to it."""
    record = services.jobs.get(job_id)
    ensure_access(principal, record)
    return expire_if_stale(
        record,
        jobs=services.jobs,
        queue=services.queue,
        storage=services.storage,
        ttl_seconds=services.settings.worker.queue_ttl_seconds,
    )


EVENT_POLL_SECONDS = 0.25
EVENT_KEEPALIVE_SECONDS = 15.0
EVENT_STREAM_MAX_SECONDS = 3600.0
"""A stream ends after an hour even if the job has not: the client reconnects if it cares."""


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}},
        401: PROBLEM,
        403: PROBLEM,
        404: PROBLEM,
    },
    summary="Live progress as Server-Sent Events (queue position, stage, step, final status)",
)
async def job_events(
    job_id: str,
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    base: BaseUrlDep,
) -> StreamingResponse:
    """One ``job`` event (the job as ``GET /v1/jobs/{id}`` shows it) whenever it changes, a
    comment line every 15 s while it does not, and the end of the stream once it has ended."""
    ensure_access(principal, await run_in_threadpool(services.jobs.get, job_id))
    return StreamingResponse(
        _job_events(request, services, job_id, base),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _job_events(
    request: Request, services: Services, job_id: str, base: str
) -> AsyncIterator[str]:
    began = last_sent = time.monotonic()
    last = ""
    while time.monotonic() - began < EVENT_STREAM_MAX_SECONDS:
        if await request.is_disconnected():
            return
        record = await run_in_threadpool(services.jobs.get, job_id)
        view = await run_in_threadpool(_public, record, services, base)
        body = view.model_dump_json()
        if body != last:
            yield f"event: job\ndata: {body}\n\n"
            last, last_sent = body, time.monotonic()
        elif time.monotonic() - last_sent > EVENT_KEEPALIVE_SECONDS:
            yield ": still there\n\n"
            last_sent = time.monotonic()
        if record.status.is_terminal:
            return
        await asyncio.sleep(EVENT_POLL_SECONDS)


@router.get(
    "/v1/jobs/{job_id}/result",
    responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
        307: {"description": "Redirect to a presigned URL"},
        401: PROBLEM,
        403: PROBLEM,
        404: PROBLEM,
        409: PROBLEM,
        410: PROBLEM,
    },
    response_class=Response,
    summary="The upscaled image, once the job has succeeded",
)
def get_result(job_id: str, services: ServicesDep, principal: PrincipalDep) -> Response:
    record = services.jobs.get(job_id)
    ensure_access(principal, record)
    if record.status is not JobStatus.SUCCEEDED or record.output is None:
        raise JobNotFinished(f"Job {job_id} is {record.status.value}; the result is not ready.")
    if services.settings.api.result_delivery == "redirect":
        url = services.storage.presigned_url(record.output_key)
        if url:
            return RedirectResponse(url, status_code=status.HTTP_307_TEMPORARY_REDIRECT)
    try:
        data = services.storage.get(record.output_key)
    except InputMissing as exc:  # deleted from the bucket by hand or by a lifecycle rule
        logger.warning("result of job %s is missing from storage", job_id)
        raise ResultGone(
            f"Job {job_id} succeeded, but its result is no longer in storage; submit it again."
        ) from exc
    filename = record.output_key.rsplit("/", 1)[-1]
    return Response(
        content=data,
        media_type=record.output.format.media_type,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.delete(
    "/v1/jobs/{job_id}",
    response_model=JobPublic,
    responses={401: PROBLEM, 403: PROBLEM, 404: PROBLEM, 409: PROBLEM},
    summary="Cancel a queued job at once, or a running job at its next step",
)
def cancel_job(
    job_id: str, services: ServicesDep, principal: PrincipalDep, base: BaseUrlDep
) -> JobPublic:
    return cancel_as(job_id, services, principal, base)


@router.post(
    "/v1/jobs/{job_id}/cancel",
    response_model=JobPublic,
    responses={401: PROBLEM, 403: PROBLEM, 404: PROBLEM, 409: PROBLEM},
    summary="Cancel a job (same as DELETE)",
)
def cancel_job_post(
    job_id: str, services: ServicesDep, principal: PrincipalDep, base: BaseUrlDep
) -> JobPublic:
    return cancel_as(job_id, services, principal, base)


def cancel_as(job_id: str, services: Services, principal: Principal, base: str) -> JobPublic:
    jobs = services.jobs
    ensure_access(principal, jobs.get(job_id))
    if jobs.transition(
        job_id,
        from_statuses=[JobStatus.QUEUED],
        to=JobStatus.CANCELED,
        finished_at=utcnow(),
        progress={"stage": "canceled", "step": 0, "total": 0},
    ):
        record = jobs.get(job_id)
        services.queue.cancel(record.rq_job_id or job_id)
        try:
            services.storage.delete(record.input_key)
        except StorageUnavailable:  # the job is canceled all the same; its input stays behind
            logger.warning("could not delete the input of canceled job %s", job_id)
        if record.wants_webhook("completed"):
            services.queue.enqueue_webhook(
                job_id, retry_intervals=services.settings.webhooks.retry_intervals_seconds
            )
        return _public(record, services, base)
    record = jobs.get(job_id)
    if record.status is JobStatus.PROCESSING:
        jobs.request_cancel(job_id)
        return _public(jobs.get(job_id), services, base)
    ended = "been canceled" if record.status is JobStatus.CANCELED else record.status.value
    raise JobAlreadyFinished(f"Job {job_id} has already {ended}.")


@router.get(
    "/v1/models",
    response_model=ModelList,
    responses={401: PROBLEM},
    summary="Every model the warm workers serve, and the default",
)
def list_models(services: ServicesDep, principal: PrincipalDep) -> ModelList:
    return ModelList(default=default_model(services.settings), models=_served_models(services))


@router.get(
    "/v1/model",
    response_model=ModelPublic,
    responses={401: PROBLEM, 503: PROBLEM},
    summary="The default model (requests that name no model get it)",
)
def get_model(services: ServicesDep, principal: PrincipalDep) -> ModelPublic:
    models = _served_models(services)
    if not models:
        raise DependencyUnavailable("No warm worker is serving a model yet.")
    return next((m for m in models if m.default), models[0])


def _served_models(services: Services) -> list[ModelPublic]:
    """One entry per model name across the warm workers, in catalogue order."""
    default = default_model(services.settings)
    by_name: dict[ModelName, ModelPublic] = {}
    for worker in services.workers.warm():
        for info in worker.models:
            entry = by_name.get(info.name)
            if entry is None:
                entry = by_name[info.name] = ModelPublic(
                    **info.model_dump(),
                    workers=0,
                    default=info.name is default,
                    warnings=[] if info.trained else [untrained_warning(info.name.value)],
                )
            entry.workers += 1
            if info.device not in entry.devices:
                entry.devices.append(info.device)
    return [by_name[name] for name in ModelName if name in by_name]


@router.get("/healthz", response_model=HealthPublic, summary="The API process is alive")
def healthz() -> HealthPublic:
    return HealthPublic(status="ok")


@router.get(
    "/readyz",
    response_model=HealthPublic,
    responses={503: PROBLEM},
    summary="Redis, storage and at least one warm worker are available",
)
def readyz(request: Request, services: ServicesDep) -> HealthPublic | JSONResponse:
    checks = _readiness(services)
    if all(value == "ok" for value in checks.values()):
        return HealthPublic(status="ok", checks=checks)
    failing = ", ".join(name for name, value in checks.items() if value != "ok")
    return problem_response(
        status.HTTP_503_SERVICE_UNAVAILABLE,  # type: ignore[arg-type]
        type_name="not-ready",
        title="Not ready",
        detail=f"Not ready: {failing}.",
        instance=request.url.path,
        checks=checks,
    )


def _readiness(services: Services) -> dict[str, str]:
    checks: dict[str, str] = {}
    try:
        services.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"unavailable: {type(exc).__name__}"
    try:
        services.storage.check()
        checks["storage"] = "ok"
    except Exception as exc:
        checks["storage"] = f"unavailable: {type(exc).__name__}"
    if checks["redis"] == "ok":
        warm = services.workers.warm()
        checks["workers"] = "ok" if warm else "no warm worker"
        default = default_model(services.settings)
        serving_default = any(info.name is default for w in warm for info in w.models)
        # Requests that name no model go to the default: without it warm they only wait.
        checks["default_model"] = "ok" if serving_default else f"{default.value} not warm"
    else:
        checks["workers"] = checks["default_model"] = "unknown"
    return checks
