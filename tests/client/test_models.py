"""Models in the client: ``models()``, ``submit(model=...)``, and the 422 for an unserved model.

The live service holds Lanczos only (``SPASEMSR_WORKER__MODELS='["lanczos"]'``, default
``lanczos``), so asking for ``spasemsr`` must be refused with the served models named.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import httpx
import pytest
from spasemsr_client import (
    MODEL_NAMES,
    AsyncSpaSemSRClient,
    JobStatus,
    ModelList,
    ModelNotServed,
    SpaSemSRClient,
)
from spasemsr_client._common import form_fields
from spasemsr_client.errors import InvalidParameters, error_from_response
from spasemsr_client.models import Job

from core.models import ModelName
from tests.conftest import ServiceProcesses, png_bytes


def test_models_lists_what_the_workers_serve(service: ServiceProcesses) -> None:
    with SpaSemSRClient(service.url) as client:
        catalogue = client.models()
        default = client.model()
    assert isinstance(catalogue, ModelList)
    assert catalogue.default == "lanczos"
    assert catalogue.names == ["lanczos"]
    lanczos = catalogue.get("lanczos")
    assert lanczos is not None
    assert lanczos.trained is True and lanczos.default is True
    assert lanczos.workers == 1 and lanczos.devices == ["cpu"]
    assert lanczos.scales == [2, 4]
    assert lanczos.warnings == []
    assert catalogue.get("spasemsr") is None
    # ``model()`` still answers: the default model, as in the list.
    assert default.name == "lanczos" and default.default is True
    assert default.model_dump() == lanczos.model_dump()


def test_submit_with_a_model_names_it_on_the_job(service: ServiceProcesses) -> None:
    with SpaSemSRClient(service.url) as client:
        named = client.submit(png_bytes(), filename="a.png", model="lanczos", scale=2)
        unnamed = client.submit(png_bytes(), filename="b.png", model=None, scale=2)
        finished = client.wait(named.id, poll_interval=0.05)
        client.wait(unnamed.id, poll_interval=0.05)
    assert named.model == "lanczos"
    assert named.model_trained is True  # its worker had announced it
    assert named.warnings == [] and not named.untrained
    assert named.parameters["model"] == "lanczos"
    assert unnamed.model == "lanczos"  # no model named: the service's default
    assert finished.status is JobStatus.SUCCEEDED
    assert finished.model == "lanczos" and finished.model_trained is True


def test_an_unserved_model_is_a_typed_422_naming_the_served_ones(
    service: ServiceProcesses,
) -> None:
    with SpaSemSRClient(service.url) as client:
        with pytest.raises(ModelNotServed) as refused:
            client.submit(png_bytes(), filename="a.png", model="spasemsr")
        with pytest.raises(InvalidParameters) as unknown:
            client.submit(png_bytes(), filename="a.png", model="no-such-model")
    error = refused.value
    assert isinstance(error, InvalidParameters)  # callers catching 422s still catch it
    assert error.status_code == 422
    assert error.title == "Model not served"
    assert error.served == ["lanczos"]
    assert "spasemsr" in error.detail and "lanczos" in str(error)
    assert not isinstance(unknown.value, ModelNotServed)
    assert unknown.value.status_code == 422


def test_async_models_submit_and_unserved_model(service: ServiceProcesses) -> None:
    async def main() -> None:
        async with AsyncSpaSemSRClient(service.url) as client:
            catalogue = await client.models()
            assert catalogue.default == "lanczos" and catalogue.names == ["lanczos"]
            job = await client.submit(png_bytes(), filename="a.png", model="lanczos", scale=2)
            assert job.model == "lanczos" and job.model_trained is True
            done = await client.wait(job.id, poll_interval=0.05)
            assert done.status is JobStatus.SUCCEEDED and done.model == "lanczos"
            with pytest.raises(ModelNotServed) as refused:
                await client.submit(png_bytes(), filename="a.png", model="realesrgan-x4plus")
            assert refused.value.served == ["lanczos"]

    asyncio.run(main())


def test_the_client_knows_every_model_of_the_service() -> None:
    assert tuple(name.value for name in ModelName) == MODEL_NAMES


def test_model_form_field_is_sent_only_when_named() -> None:
    assert "model" not in form_fields({"scale": 2})
    assert form_fields({"scale": 2}, model="lanczos") == {"scale": "2", "model": "lanczos"}


def test_untrained_jobs_and_unknown_fields_decode() -> None:
    job = Job.model_validate(
        {
            "id": "1" * 32,
            "status": "queued",
            "model": "spasemsr",
            "model_trained": False,
            "warnings": ["The spasemsr weights are untrained."],
            "priority": "default",
            "created_at": datetime(2026, 1, 1, tzinfo=UTC).isoformat(),
            "input": {"width": 1, "height": 1, "format": "png", "bytes": 1},
            "links": {"self": "/v1/jobs/1", "result": "/v1/jobs/1/result"},
            "a_field_from_a_newer_server": 1,
        }
    )
    assert job.untrained and job.model == "spasemsr"
    older = job.model_copy(update={"model": None, "model_trained": None, "warnings": []})
    assert not older.untrained


def test_served_member_survives_a_problem_without_it() -> None:
    request = httpx.Request("POST", "http://service/v1/jobs")
    bare = httpx.Response(
        422,
        json={
            "type": "https://spasemsr.dev/problems/model-not-served",
            "title": "Model not served",
        },
        request=request,
    )
    error = error_from_response(bare)
    assert isinstance(error, ModelNotServed) and error.served == []
    listed = httpx.Response(
        422,
        json={
            "type": "https://spasemsr.dev/problems/model-not-served",
            "title": "Model not served",
            "status": 422,
            "detail": "No worker of this service serves 'spasemsr'.",
            "served": ["realesrgan-x4plus", "lanczos"],
        },
        request=request,
    )
    assert error_from_response(listed).served == ["lanczos", "realesrgan-x4plus"]  # type: ignore[attr-defined]
