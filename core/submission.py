"""The submission engine: every check and write of one upload, in three Redis round trips.

``POST /v1/jobs`` parses the request and hands it here, in one worker thread: everything
below blocks (Redis, object storage, decoding the image, the webhook host's DNS) and must not
run on the event loop. In order, as the HTTP contract has them:

1. the model (one round trip: the live workers), the parameters, the byte cap, the image, the
   output size, the webhook URL;
2. admission (one round trip, ``JobQueue.admit``): the model's queue age and depth against
   their limits, the place in line reserved, the Idempotency-Key claimed, atomically;
3. the input written to object storage;
4. the commit (one round trip, a MULTI): the job record with its queued-index entry, the RQ
   entry, the end of the reservation, and the lengths the job's place in line comes from.

Whatever fails after admission leaves nothing behind: no input without a job, no record
without a queue entry, no reserved place, no claimed key (one round trip to clean up).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from redis import Redis

from core.errors import (
    IdempotencyKeyInUse,
    JobNotFound,
    ModelNotServed,
    Overloaded,
    TooManyPixels,
    UploadTooLarge,
)
from core.jobs import (
    ImageFormat,
    ImageInfo,
    JobParameters,
    JobRecord,
    JobStatus,
    Priority,
    WebhookEvent,
    input_key_for,
    new_job_id,
    output_key_for,
    payload_for,
    utcnow,
)
from core.limits import IdempotencyKeys, request_fingerprint
from core.models import ModelName, default_model
from core.owned import OwnedJobs
from core.queue import Admission, Claim, JobQueue, Outcome
from core.records import JobStore
from core.settings import Settings
from core.storage import ObjectStorage
from core.webhooks import WebhookRefused, check_url
from core.workers import WorkerInfo, WorkerRegistry

logger = logging.getLogger(__name__)


class CheckedUpload(Protocol):
    """What the image check found out (``app.uploads.CheckedImage``)."""

    @property
    def format(self) -> ImageFormat: ...

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...


class ImageCheck(Protocol):
    """Validates an upload's bytes completely, raising a typed client error at the first
    problem (``app.uploads.check_image``: the upload formats are the HTTP layer's business)."""

    def __call__(self, data: bytes, *, max_bytes: int, max_pixels: int) -> CheckedUpload: ...


@dataclass(frozen=True)
class Submission:
    """One upload as the HTTP layer parsed it."""

    data: bytes
    """The image bytes; at most one byte past the cap is enough to refuse them."""
    model: ModelName | None
    parameters_for: Callable[[ModelName], JobParameters]
    """The job's parameters once the model is known; raises ``InvalidParameters``."""
    priority: Priority
    webhook_url: str | None
    client: str
    """Whose Idempotency-Keys these are (the API key's name, or ``anonymous``)."""
    owner: str | None
    """The API key that will own the job (``None`` without authentication)."""
    idempotency_key: str | None = None
    webhook_events: tuple[WebhookEvent, ...] | None = None
    """A prediction's webhook events (``JobRecord.webhook_events``); ``None``: a job's."""
    api_url: str | None = None
    """Where the client reached the API (``JobRecord.api_url``)."""


@dataclass(frozen=True)
class Accepted:
    record: JobRecord
    position: int | None
    """0-based place in line when the answer was written (``None``: no longer queued)."""
    replayed: bool = False
    """An earlier request with the same Idempotency-Key created this job."""


class SubmissionService:
    """Accepts uploads: blocking calls only, to be run in one worker thread per upload."""

    def __init__(
        self,
        *,
        settings: Settings,
        redis: Redis,
        storage: ObjectStorage,
        jobs: JobStore,
        queue: JobQueue,
        workers: WorkerRegistry,
        idempotency: IdempotencyKeys,
        check_image: ImageCheck,
    ) -> None:
        # Settings are read on every call, not copied: they may be changed while serving.
        self._settings = settings
        self._redis = redis
        self._storage = storage
        self._jobs = jobs
        self._queue = queue
        self._workers = workers
        self._idempotency = idempotency
        self._check_image = check_image
        self._owned = OwnedJobs(
            redis, prefix=settings.redis.key_prefix, ttl_seconds=settings.worker.record_ttl_seconds
        )

    def submit(self, submission: Submission) -> Accepted:
        """Check, admit, store and queue one upload, or raise the error that refused it."""
        model, trained = self.choose_model(submission.model)
        parameters = submission.parameters_for(model)
        info = self._checked(submission.data, parameters)
        if submission.webhook_url is not None:
            self._check_webhook(submission.webhook_url)
        record = self._new_record(submission, parameters, info, trained)
        fingerprint = None
        if submission.idempotency_key is not None:
            fingerprint = request_fingerprint(
                submission.data, parameters.model_dump_json(), submission.priority
            )
        admission = self._admit(model, record.id, submission, fingerprint)
        if admission.outcome is Outcome.CLAIMED_BEFORE:
            assert admission.earlier_claim is not None and fingerprint is not None
            earlier = IdempotencyKeys.earlier_job(admission.earlier_claim, fingerprint)
            return self._replay(earlier)
        try:
            self._storage.put(
                record.input_key, submission.data, content_type=info.format.media_type
            )
            position = self._commit(record, submission.client)
        except BaseException:
            # Nothing half-accepted stays behind: no orphan input, no record without a queue
            # entry, no place held in line, no claimed key.
            self._withdraw(record, submission)
            raise
        logger.info("job %s queued (%s, %dx%d, x%d)",
                    record.id, model.value, info.width, info.height, parameters.scale)  # fmt: skip
        return Accepted(record, position)

    def choose_model(self, requested: ModelName | None) -> tuple[ModelName, bool | None]:
        """The model a request gets, and whether its weights are trained as far as is known.

        The default model is always accepted (its jobs wait for a worker, like any job while
        workers start); a model named explicitly must be held by a live worker, warming
        included.
        """
        default = default_model(self._settings)
        live = self._workers.live()
        chosen = requested or default
        served = {name for worker in live for name in worker.serving}
        if chosen is not default and chosen not in served:
            names = sorted(name.value for name in served | {default})
            raise ModelNotServed(
                f"No worker of this service serves {chosen.value!r}; served: {', '.join(names)}.",
                served=names,
            )
        return chosen, _trained(live, chosen)

    def _checked(self, data: bytes, parameters: JobParameters) -> ImageInfo:
        api = self._settings.api
        if len(data) > api.max_upload_bytes:
            raise UploadTooLarge(
                f"The image is larger than the limit of {api.max_upload_bytes} bytes."
            )
        checked = self._check_image(
            data, max_bytes=api.max_upload_bytes, max_pixels=api.max_input_pixels
        )
        output_pixels = checked.width * checked.height * parameters.scale**2
        if output_pixels > api.max_output_pixels:
            raise TooManyPixels(
                f"At scale {parameters.scale} the output would be {output_pixels} pixels; "
                f"the limit is {api.max_output_pixels}."
            )
        return ImageInfo(
            width=checked.width, height=checked.height, format=checked.format, bytes=len(data)
        )

    def _check_webhook(self, url: str) -> None:
        webhooks = self._settings.webhooks
        if webhooks.secret is None:
            raise WebhookRefused("Webhooks are not enabled on this service.")
        check_url(url, allow_networks=webhooks.allow_networks)

    def _new_record(
        self,
        submission: Submission,
        parameters: JobParameters,
        info: ImageInfo,
        trained: bool | None,
    ) -> JobRecord:
        job_id = new_job_id()
        return JobRecord(
            id=job_id,
            status=JobStatus.QUEUED,
            priority=submission.priority,
            parameters=parameters,
            input=info,
            input_key=input_key_for(job_id),
            output_key=output_key_for(job_id, parameters.output_format),
            created_at=utcnow(),
            owner=submission.owner,
            webhook_url=submission.webhook_url,
            webhook_events=(
                None if submission.webhook_events is None else list(submission.webhook_events)
            ),
            api_url=submission.api_url,
            model_trained=trained,
        )

    def _admit(
        self, model: ModelName, job_id: str, submission: Submission, fingerprint: str | None
    ) -> Admission:
        """Backpressure per model: each model has its own queues and often its own worker
        pool, so one stalled model (its pool down or still warming) must not refuse the
        others' uploads. The depth cap is hard: the place is reserved atomically (every API
        process together) and held until the job is queued."""
        api = self._settings.api
        claim = None
        if submission.idempotency_key is not None and fingerprint is not None:
            claim = Claim(
                key=self._idempotency.key_for(submission.client, submission.idempotency_key),
                value=IdempotencyKeys.value_for(job_id, fingerprint),
                ttl_seconds=self._idempotency.ttl_seconds,
            )
        now = utcnow().timestamp()
        admission = self._queue.admit(
            model,
            job_id,
            cap=api.max_queue_depth,
            oldest_allowed=now - api.max_queue_age_seconds,
            claim=claim,
        )
        if admission.outcome is Outcome.TOO_OLD:
            age = now - (admission.oldest_enqueued or now)
            raise Overloaded(
                f"The oldest queued {model.value} job has waited {age:.0f} s "
                f"(limit {api.max_queue_age_seconds:.0f} s); retry later.",
                retry_after_seconds=api.retry_after_seconds,
            )
        if admission.outcome is Outcome.FULL:
            raise Overloaded(
                f"{admission.depth} {model.value} jobs are waiting or being admitted "
                f"(limit {api.max_queue_depth}); retry later.",
                retry_after_seconds=api.retry_after_seconds,
            )
        return admission

    def _commit(self, record: JobRecord, client: str) -> int:
        """The record, its queued-index and owner-index entries and its RQ entry in one
        transaction, which also ends the reservation and reads the job's place in line: one
        round trip."""
        worker = self._settings.worker
        with self._redis.pipeline() as pipe:
            pipe.multi()  # explicit: RQ's enqueue_job begins one only on an empty pipeline
            self._jobs.create(record, pipeline=pipe)
            self._owned.stage(pipe, client, record.id, record.created_at.timestamp())
            position_of = self._queue.stage_entry(
                pipe,
                payload_for(record),
                record.priority,
                timeout_seconds=worker.job_timeout_seconds,
                keep_seconds=worker.record_ttl_seconds,
            )
            answers = pipe.execute()
        return position_of(answers)

    def _withdraw(self, record: JobRecord, submission: Submission) -> None:
        """Best effort (the original error matters more): undo all that admission and the
        commit may have written, in one round trip, and delete the input."""
        model = record.model
        assert model is not None  # the submission filled it in
        try:
            with self._redis.pipeline() as pipe:
                self._jobs.delete(record.id, pipeline=pipe)
                self._queue.stage_withdrawal(pipe, record.id, model, record.priority)
                if submission.idempotency_key is not None:
                    pipe.delete(
                        self._idempotency.key_for(submission.client, submission.idempotency_key)
                    )
                pipe.execute()
        except Exception:
            logger.warning("could not withdraw the failed submission of %s", record.id)
        try:
            self._storage.delete(record.input_key)
        except Exception:
            logger.warning("could not delete the input of the failed submission of %s", record.id)

    def _replay(self, job_id: str) -> Accepted:
        """The job an earlier request with the same Idempotency-Key created."""
        try:
            record = self._jobs.get(job_id)
        except JobNotFound as exc:  # claimed, but its record is not written yet
            raise IdempotencyKeyInUse(
                "The first request with this Idempotency-Key has not finished; retry shortly."
            ) from exc
        return Accepted(record, self.position(record), replayed=True)

    def position(self, record: JobRecord) -> int | None:
        """A queued job's place in line now (``None`` for any other status)."""
        if record.status is not JobStatus.QUEUED or record.model is None:
            return None
        return self._queue.position(record.rq_job_id or record.id, record.model, record.priority)


def _trained(live: list[WorkerInfo], model: ModelName) -> bool | None:
    return next(
        (info.trained for worker in live for info in worker.models if info.name is model), None
    )
