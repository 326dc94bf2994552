"""The asyncio client: ``AsyncSpaSemSRClient`` (same methods as the sync one, awaitable)."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
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


class AsyncSpaSemSRClient:
    """The asyncio twin of ``SpaSemSRClient``; ``on_progress`` may be sync or async.

    >>> async with AsyncSpaSemSRClient("http://127.0.0.1:8000") as client:  # doctest: +SKIP
    ...     job = await client.submit("photo.png", scale=4)
    ...     job = await client.wait(job.id)
    ...     await client.download(job.id, "photo-x4.png")
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        api_key: str | None = None,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            headers=build_headers(api_key, headers),
            transport=transport,
        )

    # --- lifecycle -------------------------------------------------------------------------

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- the API ---------------------------------------------------------------------------

    async def submit(
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
        response = await self._request(
            "POST",
            "/v1/jobs",
            files={"image": image_part(image, filename)},
            data=form_fields(options, model=model),
            headers=submit_headers(idempotency_key),
        )
        return decode_job(response)

    async def get(self, job_id: str) -> Job:
        return decode_job(await self._request("GET", f"/v1/jobs/{job_id}"))

    async def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once, a running one at its next step."""
        return decode_job(await self._request("DELETE", f"/v1/jobs/{job_id}"))

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = 0.25,
        on_progress: ProgressHandler | None = None,
        raise_on_failure: bool = True,
    ) -> Job:
        """Follow the job until it ends (see ``SpaSemSRClient.wait``)."""
        seen: tuple[object, ...] | None = None
        job: Job | None = None
        async with aclosing(
            self.events(job_id, timeout=timeout, poll_interval=poll_interval)
        ) as jobs:
            async for job in jobs:
                if on_progress is not None and job_signature(job) != seen:
                    seen = job_signature(job)
                    outcome = on_progress(job)
                    if inspect.isawaitable(outcome):
                        await outcome
        assert job is not None and job.is_terminal  # events() ends only with the final state
        return check_outcome(job) if raise_on_failure else job

    async def events(
        self, job_id: str, *, timeout: float | None = None, poll_interval: float = 0.25
    ) -> AsyncGenerator[Job]:
        """The job each time it changes, until it ends (see ``SpaSemSRClient.events``)."""
        deadline = deadline_after(timeout)
        last: Job | None = None
        follow = self._streamed
        while True:
            try:
                async with aclosing(follow(job_id, deadline, timeout, poll_interval)) as jobs:
                    async for job in jobs:
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
            job = await self.get(job_id)  # where it stands while the stream was not there
            if job != last:
                last = job
                yield job
            if job.is_terminal:
                return
            await asyncio.sleep(poll_interval)

    async def _streamed(
        self, job_id: str, deadline: float | None, timeout: float | None, interval: float
    ) -> AsyncGenerator[Job]:
        """The jobs of one event stream, until the service ends it (``interval``: unused, the
        service paces the stream)."""
        async with self._http.stream(
            "GET",
            f"/v1/jobs/{job_id}/events",
            headers=EVENTS_HEADERS,
            timeout=stream_timeout(self._http.timeout, deadline),
        ) as response:
            if response.status_code != 200:
                await response.aread()
                open_events_check(response)
            parser = EventParser()
            async for line in response.aiter_lines():
                job = job_of(parser.feed(line))
                if job is not None:
                    yield job
                check_deadline(job_id, deadline, timeout)

    async def _polled(
        self, job_id: str, deadline: float | None, timeout: float | None, interval: float
    ) -> AsyncGenerator[Job]:
        """The job every ``interval`` seconds, until it ends."""
        while True:
            job = await self.get(job_id)
            yield job
            if job.is_terminal:
                return
            check_deadline(job_id, deadline, timeout)
            await asyncio.sleep(interval)

    async def result(self, job_id: str) -> bytes:
        """The result image's bytes (``JobNotFinished`` until the job succeeded)."""
        response = await self._request("GET", f"/v1/jobs/{job_id}/result", follow_redirects=True)
        return response.content

    async def download(self, job_id: str, path: str | Path) -> Path:
        """Stream the result to ``path`` (written to a temporary sibling, then renamed)."""
        target = Path(path)
        partial = target.with_name(target.name + ".part")
        try:
            async with self._http.stream(
                "GET", f"/v1/jobs/{job_id}/result", follow_redirects=True
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise_for_problem(response)
                with partial.open("wb") as out:
                    async for chunk in response.aiter_bytes():
                        out.write(chunk)
        except httpx.TransportError as exc:
            partial.unlink(missing_ok=True)
            raise ServiceUnreachable(f"cannot reach {self.base_url}: {exc}") from exc
        partial.replace(target)
        return target

    async def upscale(
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
        job = await self.submit(image, model=model, filename=filename, **options)
        job = await self.wait(job.id, timeout=timeout, on_progress=on_progress)
        await self.download(job.id, out)
        return job

    async def models(self) -> ModelList:
        """Every model the warm workers serve, and the service's default."""
        return ModelList.model_validate((await self._request("GET", "/v1/models")).json())

    async def model(self) -> ModelDescription:
        """The default model (``ServiceUnavailable`` while no warm worker serves a model)."""
        response = await self._request("GET", "/v1/model")
        return ModelDescription.model_validate(response.json())

    async def health(self) -> Health:
        return await self._health("/healthz")

    async def ready(self) -> Health:
        """Readiness (Redis, storage, a warm worker); ``ServiceUnavailable`` when not ready."""
        return await self._health("/readyz")

    # --- plumbing --------------------------------------------------------------------------

    async def _health(self, path: str) -> Health:
        response = await self._http_send("GET", path)
        raise_for_problem(response)
        return Health.model_validate(response.json())

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send, retrying 429/503 as the policy says; raise the typed error of any 4xx/5xx."""
        attempt = 0
        while True:
            response = await self._http_send(method, path, **kwargs)
            if not should_retry(response):
                raise_for_problem(response)
                return response
            retry_after = retry_after_of(response)
            delay = self.retry.delay(attempt, retry_after)
            if delay is None:
                raise error_from_response(response, retry_after=retry_after)
            logger.info("%s %s: %d, retrying in %.1f s", method, path, response.status_code, delay)
            await asyncio.sleep(delay)
            attempt += 1

    async def _http_send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceUnreachable(f"cannot reach {self.base_url}: {exc}") from exc
