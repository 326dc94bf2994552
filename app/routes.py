"""The v1 routes: a thin HTTP layer over the job store, the queue and object storage."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Header, Request, Response, UploadFile, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import ValidationError

from app.errors import problem_response
from app.schemas import HealthPublic, JobCreate, JobLinks, JobPublic, ModelList, ModelPublic
from app.security import Principal, PrincipalDep, RateLimitDep, ensure_access
from app.services import Services, ServicesDep
from app.uploads import check_image
from core.errors import (
    DependencyUnavailable,
    IdempotencyKeyInUse,
    InputMissing,
    InvalidParameters,
    JobAlreadyFinished,
    JobNotFinished,
    ModelNotServed,
    Overloaded,
    ResultGone,
    StorageUnavailable,
    TooManyPixels,
    UploadTooLarge,
)
from core.jobs import (
    ImageInfo,
    JobPayload,
    JobRecord,
    JobStatus,
    input_key_for,
    new_job_id,
    output_key_for,
    utcnow,
)
from core.limits import request_fingerprint
from core.models import ModelName, default_model
from core.queue import Admission
from core.recovery import expire_if_stale
from core.settings import Settings
from core.webhooks import WebhookRefused, check_url

logger = logging.getLogger(__name__)

router = APIRouter()

PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}


def _links(job_id: str) -> JobLinks:
    return JobLinks(self=f"/v1/jobs/{job_id}", result=f"/v1/jobs/{job_id}/result")


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


def _public(record: JobRecord, services: Services) -> JobPublic:
    position = None
    if record.status is JobStatus.QUEUED and record.model is not None:
        position = services.queue.position(
            record.rq_job_id or record.id, record.model, record.priority
        )
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
        links=_links(record.id),
    )


def _admission(services: ServicesDep) -> Iterator[Admission]:
    """The request's place in its model's line, given back when the request ends if its job's
    enqueue did not take it over (refused later, replayed, storage down)."""
    admission = Admission(services.queue)
    try:
        yield admission
    finally:
        admission.release()


AdmissionDep = Annotated[Admission, Depends(_admission)]


@router.post(
    "/v1/jobs",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    responses={code: PROBLEM for code in (401, 409, 413, 415, 422, 429, 503)},
    dependencies=[RateLimitDep],
    summary="Upload an image and queue an upscaling job",
)
async def create_job(
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    image: Annotated[UploadFile, File(description="PNG, JPEG or WebP image.")],
    form: Annotated[JobCreate, Form()],
    response: Response,
    admission: AdmissionDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=255,
            description="Repeat a request safely: the same key returns the same job.",
        ),
    ] = None,
) -> JobPublic:
    settings = services.settings
    await _refuse_unknown_fields(request)
    model, trained = await run_in_threadpool(_choose_model, form.model, services)
    try:
        parameters = form.parameters(model)
    except ValidationError as exc:
        raise InvalidParameters(_first_message(exc)) from exc
    data = await _read_capped(image, settings.api.max_upload_bytes)
    checked = await run_in_threadpool(
        check_image,
        data,
        max_bytes=settings.api.max_upload_bytes,
        max_pixels=settings.api.max_input_pixels,
    )
    output_pixels = checked.width * checked.height * parameters.scale**2
    if output_pixels > settings.api.max_output_pixels:
        raise TooManyPixels(
            f"At scale {parameters.scale} the output would be {output_pixels} pixels; "
            f"the limit is {settings.api.max_output_pixels}."
        )
    if form.webhook_url is not None:
        await run_in_threadpool(_check_webhook, form.webhook_url, settings)
    job_id = new_job_id()
    await run_in_threadpool(_refuse_when_full, services, model, job_id, admission)
    if idempotency_key is not None:
        fingerprint = request_fingerprint(data, parameters.model_dump_json(), form.priority)
        earlier = services.idempotency.claim(
            principal.name, idempotency_key, job_id=job_id, fingerprint=fingerprint
        )
        if earlier is not None:
            return _replay(earlier, services, response)
    info = ImageInfo(
        width=checked.width, height=checked.height, format=checked.format, bytes=len(data)
    )
    record = JobRecord(
        id=job_id,
        status=JobStatus.QUEUED,
        priority=form.priority,
        parameters=parameters,
        input=info,
        input_key=input_key_for(job_id),
        output_key=output_key_for(job_id, parameters.output_format),
        created_at=utcnow(),
        owner=principal.name if principal.authenticated else None,
        webhook_url=form.webhook_url,
        model_trained=trained,
    )
    try:
        await run_in_threadpool(
            services.storage.put, record.input_key, data, content_type=checked.format.media_type
        )
        services.jobs.create(record)
        services.queue.enqueue(
            JobPayload(
                job_id=job_id,
                input_key=record.input_key,
                output_key=record.output_key,
                input=info,
                parameters=parameters,
            ),
            form.priority,
            timeout_seconds=settings.worker.job_timeout_seconds,
            keep_seconds=settings.worker.record_ttl_seconds,
        )
    except BaseException:
        # Nothing half-accepted stays behind: no orphan input, no record without a queue entry.
        await run_in_threadpool(_forget, services, record)
        if idempotency_key is not None:
            services.idempotency.release(principal.name, idempotency_key)
        raise
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    logger.info("job %s queued (%s, %dx%d, x%d)",
                job_id, model.value, info.width, info.height, parameters.scale)  # fmt: skip
    return _public(record, services)


FORM_FIELDS = frozenset(JobCreate.model_fields) | {"image"}


async def _refuse_unknown_fields(request: Request) -> None:
    """A misspelt parameter must not be silently ignored (``stpes=50`` is an error)."""
    form = await request.form()  # already parsed by FastAPI: this reads its cache
    unknown = sorted(set(form.keys()) - FORM_FIELDS)
    if unknown:
        raise InvalidParameters(f"Unknown form field(s): {', '.join(unknown)}.")
    if len(form.getlist("image")) != 1:
        raise InvalidParameters("Send exactly one 'image' file part.")


def _choose_model(requested: ModelName | None, services: Services) -> tuple[ModelName, bool | None]:
    """The model a request gets, and whether its weights are trained as far as is known.

    The default model is always accepted (its jobs wait for a worker, like any job while
    workers start); a model named explicitly must be held by a live worker, warming included.
    """
    default = default_model(services.settings)
    live = services.workers.live()
    chosen = requested or default
    served = {name for worker in live for name in worker.serving}
    if chosen is not default and chosen not in served:
        names = sorted(name.value for name in served | {default})
        raise ModelNotServed(
            f"No worker of this service serves {chosen.value!r}; served: {', '.join(names)}.",
            served=names,
        )
    trained = next(
        (info.trained for worker in live for info in worker.models if info.name is chosen), None
    )
    return chosen, trained


def _forget(services: Services, record: JobRecord) -> None:
    try:
        services.storage.delete(record.input_key)
        services.jobs.delete(record.id)
    except Exception:  # the original error matters more; this is best effort
        logger.warning("could not clean up after the failed enqueue of %s", record.id)


async def _read_capped(upload: UploadFile, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await upload.read(1024 * 1024):
        size += len(chunk)
        if size > max_bytes:
            raise UploadTooLarge(f"The image is larger than the limit of {max_bytes} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_webhook(url: str, settings: Settings) -> None:
    if settings.webhooks.secret is None:
        raise WebhookRefused("Webhooks are not enabled on this service.")
    check_url(url, allow_networks=settings.webhooks.allow_networks)


def _replay(job_id: str, services: Services, response: Response) -> JobPublic:
    if not services.jobs.exists(job_id):
        raise IdempotencyKeyInUse(
            "The first request with this Idempotency-Key has not finished; retry shortly."
        )
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    response.headers["Idempotent-Replayed"] = "true"
    return _public(services.jobs.get(job_id), services)


def _refuse_when_full(
    services: Services, model: ModelName, job_id: str, admission: Admission
) -> None:
    """Backpressure per model: each model has its own queues and often its own worker pool, so
    one stalled model (its pool down or still warming) must not refuse the others' uploads.

    The depth cap is hard: the place is reserved atomically (every API process together)
    and held until the job is queued; the age limit is read, a softer signal."""
    api = services.settings.api
    oldest = min(
        (
            stamp
            for (name, _), stamp in services.queue.oldest_enqueued().items()
            if name is model and stamp is not None
        ),
        default=None,
    )
    if oldest is not None:
        age = (utcnow() - oldest).total_seconds()
        if age > api.max_queue_age_seconds:
            raise Overloaded(
                f"The oldest queued {model.value} job has waited {age:.0f} s "
                f"(limit {api.max_queue_age_seconds:.0f} s); retry later.",
                retry_after_seconds=api.retry_after_seconds,
            )
    depth = admission.reserve(model, job_id, cap=api.max_queue_depth)
    if depth is not None:
        raise Overloaded(
            f"{depth} {model.value} jobs are waiting or being admitted "
            f"(limit {api.max_queue_depth}); retry later.",
            retry_after_seconds=api.retry_after_seconds,
        )


def _first_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))


@router.get(
    "/v1/jobs/{job_id}",
    response_model=JobPublic,
    responses={401: PROBLEM, 403: PROBLEM, 404: PROBLEM, 503: PROBLEM},
    summary="Status, progress and timings of a job",
)
def get_job(job_id: str, services: ServicesDep, principal: PrincipalDep) -> JobPublic:
    record = services.jobs.get(job_id)
    ensure_access(principal, record)
    record = expire_if_stale(
        record,
        jobs=services.jobs,
        queue=services.queue,
        storage=services.storage,
        ttl_seconds=services.settings.worker.queue_ttl_seconds,
    )
    return _public(record, services)


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
def cancel_job(job_id: str, services: ServicesDep, principal: PrincipalDep) -> JobPublic:
    return _cancel(job_id, services, principal)


@router.post(
    "/v1/jobs/{job_id}/cancel",
    response_model=JobPublic,
    responses={401: PROBLEM, 403: PROBLEM, 404: PROBLEM, 409: PROBLEM},
    summary="Cancel a job (same as DELETE)",
)
def cancel_job_post(job_id: str, services: ServicesDep, principal: PrincipalDep) -> JobPublic:
    return _cancel(job_id, services, principal)


def _cancel(job_id: str, services: Services, principal: Principal) -> JobPublic:
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
        if record.webhook_url:
            services.queue.enqueue_webhook(
                job_id, retry_intervals=services.settings.webhooks.retry_intervals_seconds
            )
        return _public(record, services)
    record = jobs.get(job_id)
    if record.status is JobStatus.PROCESSING:
        jobs.request_cancel(job_id)
        return _public(jobs.get(job_id), services)
    raise JobAlreadyFinished(f"Job {job_id} is already {record.status.value}.")


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
