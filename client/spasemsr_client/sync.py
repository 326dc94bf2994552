"""The blocking client: ``SpaSemSRClient``."""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from contextlib import closing
from pathlib import Path
from types import TracebackType
from typing import Any, Self, Unpack

import httpx

from spasemsr_client._common import (
    DEFAULT_URL,
    EVENTS_HEADERS,
    EventParser,
    EventsUnsupported,
    ImageSource,
    JobOptions,
    ProgressHandler,
    RetryPolicy,
    build_headers,
    check_deadline,
    check_outcome,
    deadline_after,
    decode_job,
    form_fields,
    image_part,
    job_of,
    job_signature,
    open_events_check,
    raise_for_problem,
    retry_after_of,
    should_retry,
    stream_timeout,
    submit_headers,
)
from spasemsr_client.errors import ServiceUnreachable, error_from_response
from spasemsr_client.models import Health, Job, ModelDescription, ModelList

logger = logging.getLogger(__name__)


class SpaSemSRClient:
    """Talks to a SpaSemSR Serve instance over its v1 HTTP API.

    >>> with SpaSemSRClient("http://127.0.0.1:8000") as client:  # doctest: +SKIP
    ...     job = client.submit("photo.png", scale=4, steps=20)
    ...     job = client.wait(job.id, on_progress=lambda j: print(j.status, j.progress))
    ...     client.download(job.id, "photo-x4.png")

    ``timeout`` bounds each HTTP request (seconds); ``retry`` says how 429 and 503 answers are
    retried (honouring ``Retry-After``). Every failure is a ``spasemsr_client.errors.ClientError``.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        api_key: str | None = None,
        headers: dict[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            headers=build_headers(api_key, headers),
            transport=transport,
        )

    # --- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- the API ---------------------------------------------------------------------------

    def submit(
        self,
        image: ImageSource,
        *,
        model: str | None = None,
        filename: str | None = None,
        idempotency_key: str | None = None,
        **options: Unpack[JobOptions],
    ) -> Job:
        """Upload an image and queue a job; the job as accepted (``queued``).

        ``model`` names one of the models the service serves (see ``models()``); ``None``
        takes the service's default. A model it does not serve raises ``ModelNotServed``,
        whose ``served`` lists the ones it does. The job's ``model``, ``model_trained`` and
        ``warnings`` say what runs it (e.g. untrained weights).

        With an ``idempotency_key``, sending the same request again returns the same job.
        """
        response = self._request(
            "POST",
            "/v1/jobs",
            files={"image": image_part(image, filename)},
            data=form_fields(options, model=model),
            headers=submit_headers(idempotency_key),
        )
        return decode_job(response)

    def get(self, job_id: str) -> Job:
        return decode_job(self._request("GET", f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once, a running one at its next step."""
        return decode_job(self._request("DELETE", f"/v1/jobs/{job_id}"))

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = 0.25,
        on_progress: ProgressHandler | None = None,
        raise_on_failure: bool = True,
    ) -> Job:
        """Follow the job until it ends; ``on_progress`` sees every change of status, queue
        position, stage or step. The job's event stream carries the changes (see ``events``).

        Raises ``JobFailed`` / ``JobCanceled`` when it did not succeed (unless
        ``raise_on_failure`` is false) and ``WaitTimeout`` after ``timeout`` seconds.
        """
        seen: tuple[object, ...] | None = None
        job: Job | None = None
        with closing(self.events(job_id, timeout=timeout, poll_interval=poll_interval)) as jobs:
            for job in jobs:
                if on_progress is not None and job_signature(job) != seen:
                    seen = job_signature(job)
                    on_progress(job)
        assert job is not None and job.is_terminal  # events() ends only with the final state
        return check_outcome(job) if raise_on_failure else job

    def events(
        self, job_id: str, *, timeout: float | None = None, poll_interval: float = 0.25
    ) -> Generator[Job]:
        """The job each time it changes, as ``GET /v1/jobs/{id}/events`` streams it; the last
        one is its final state (succeeded, failed or canceled: no error is raised for those).

        A stream that breaks or ends early is replaced after one ``GET`` of the job (which
        raises ``ServiceUnreachable`` if the service is gone); a service without the stream
        is polled every ``poll_interval`` seconds. ``WaitTimeout`` after ``timeout`` seconds.
        """
        deadline = deadline_after(timeout)
        last: Job | None = None
        follow = self._streamed
        while True:
            try:
                with closing(follow(job_id, deadline, timeout, poll_interval)) as jobs:
                    for job in jobs:
                        if job != last:
                            last = job
                            yield job
                        if job.is_terminal:
                            return
            except EventsUnsupported:
                logger.info("no event stream for jobs at %s: polling", self.base_url)
                follow = self._polled
                continue
            except httpx.TransportError as exc:
                logger.info("event stream of job %s broke (%s): reconnecting", job_id, exc)
            check_deadline(job_id, deadline, timeout)
            job = self.get(job_id)  # where it stands while the stream was not there
            if job != last:
                last = job
                yield job
            if job.is_terminal:
                return
            time.sleep(poll_interval)

    def _streamed(
        self, job_id: str, deadline: float | None, timeout: float | None, interval: float
    ) -> Generator[Job]:
        """The jobs of one event stream, until the service ends it (``interval``: unused, the
        service paces the stream)."""
        with self._http.stream(
            "GET",
            f"/v1/jobs/{job_id}/events",
            headers=EVENTS_HEADERS,
            timeout=stream_timeout(self._http.timeout, deadline),
        ) as response:
            if response.status_code != 200:
                response.read()
                open_events_check(response)
            parser = EventParser()
            for line in response.iter_lines():
                job = job_of(parser.feed(line))
                if job is not None:
                    yield job
                check_deadline(job_id, deadline, timeout)

    def _polled(
        self, job_id: str, deadline: float | None, timeout: float | None, interval: float
    ) -> Generator[Job]:
        """The job every ``interval`` seconds, until it ends."""
        while True:
            job = self.get(job_id)
            yield job
            if job.is_terminal:
                return
            check_deadline(job_id, deadline, timeout)
            time.sleep(interval)

    def result(self, job_id: str) -> bytes:
        """The result image's bytes (``JobNotFinished`` until the job succeeded)."""
        return self._request("GET", f"/v1/jobs/{job_id}/result", follow_redirects=True).content

    def download(self, job_id: str, path: str | Path) -> Path:
        """Stream the result to ``path`` (written to a temporary sibling, then renamed)."""
        target = Path(path)
        partial = target.with_name(target.name + ".part")
        try:
            with self._http.stream(
                "GET", f"/v1/jobs/{job_id}/result", follow_redirects=True
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise_for_problem(response)
                with partial.open("wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
        except httpx.TransportError as exc:
            partial.unlink(missing_ok=True)
            raise ServiceUnreachable(f"cannot reach {self.base_url}: {exc}") from exc
        partial.replace(target)
        return target

    def upscale(
        self,
        image: ImageSource,
        out: str | Path,
        *,
        timeout: float | None = None,
        on_progress: ProgressHandler | None = None,
        model: str | None = None,
        filename: str | None = None,
        **options: Unpack[JobOptions],
    ) -> Job:
        """Submit, wait and download in one call; the finished job."""
        job = self.submit(image, model=model, filename=filename, **options)
        job = self.wait(job.id, timeout=timeout, on_progress=on_progress)
        self.download(job.id, out)
        return job

    def models(self) -> ModelList:
        """Every model the warm workers serve (name, trained or not, source, licence, scales,
        devices, workers) and the service's default."""
        return ModelList.model_validate(self._request("GET", "/v1/models").json())

    def model(self) -> ModelDescription:
        """The default model (``ServiceUnavailable`` while no warm worker serves a model)."""
        response = self._request("GET", "/v1/model")
        return ModelDescription.model_validate(response.json())

    def health(self) -> Health:
        return self._health("/healthz")

    def ready(self) -> Health:
        """Readiness (Redis, storage, a warm worker); ``ServiceUnavailable`` when not ready."""
        return self._health("/readyz")

    # --- plumbing --------------------------------------------------------------------------

    def _health(self, path: str) -> Health:
        response = self._http_send("GET", path)
        raise_for_problem(response)
        return Health.model_validate(response.json())

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send, retrying 429/503 as the policy says; raise the typed error of any 4xx/5xx."""
        attempt = 0
        while True:
            response = self._http_send(method, path, **kwargs)
            if not should_retry(response):
                raise_for_problem(response)
                return response
            retry_after = retry_after_of(response)
            delay = self.retry.delay(attempt, retry_after)
            if delay is None:
                raise error_from_response(response, retry_after=retry_after)
            logger.info("%s %s: %d, retrying in %.1f s", method, path, response.status_code, delay)
            time.sleep(delay)
            attempt += 1

    def _http_send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceUnreachable(f"cannot reach {self.base_url}: {exc}") from exc
