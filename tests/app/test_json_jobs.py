"""``POST /v1/jobs`` with a JSON body: the image by reference (a data: URI, one of our own
files, an external URL under the SSRF rules), the form's fields, the same answers."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from core.embedded_redis import EmbeddedRedis
from core.settings import Settings
from tests.app.test_replicate import _Listener
from tests.conftest import png_bytes, start_service, wait_for_status


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


class Answer(Protocol):
    """What the tests read of a response (httpx's and the ASGI test client's alike)."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def text(self) -> str: ...
    def json(self) -> Any: ...


def _problem(response: Answer, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = response.json()
    assert body["status"] == status and "Traceback" not in response.text
    return body


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_a_json_job_runs_like_an_upload(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    service = start_service(
        redis_server.url, tmp_path,
        SPASEMSR_WORKER__MODELS='["lanczos"]', SPASEMSR_MODEL__DEFAULT="lanczos",
    )  # fmt: skip
    try:
        with httpx.Client(base_url=service.url, timeout=60) as client:
            created = client.post(
                "/v1/jobs",
                json={"image": data_uri(png_bytes(24, 16)), "scale": 2, "output_format": "webp"},
            )
            assert created.status_code == 202, created.text
            job = created.json()
            assert created.headers["location"] == f"{service.url}/v1/jobs/{job['id']}"
            size = len(png_bytes(24, 16))
            assert job["input"] == {"width": 24, "height": 16, "format": "png", "bytes": size}
            done = wait_for_status(client, job["id"], {"succeeded", "failed"})
            assert done["status"] == "succeeded", done
            result = client.get(f"/v1/jobs/{job['id']}/result")
            assert result.headers["content-type"] == "image/webp"
            assert Image.open(io.BytesIO(result.content)).size == (48, 32)

            # One of our own files, by id, and Prefer: wait as for an upload.
            stored = client.post(
                "/v1/files", files={"content": ("a.png", png_bytes(10, 6), "image/png")}
            ).json()
            waited = client.post(
                "/v1/jobs",
                json={"image": stored["id"], "scale": 4, "tags": ["sky", "sea"]},
                headers={"Prefer": "wait=30"},
            )
            assert waited.status_code == 200, waited.text
            finished = waited.json()
            assert finished["status"] == "succeeded"
            assert finished["output"]["width"] == 40 and finished["output"]["height"] == 24
            assert finished["parameters"]["tags"] == ["sky", "sea"]
    finally:
        service.stop()


def test_an_own_file_url_is_read_from_storage(client: TestClient) -> None:
    stored = client.post(
        "/v1/files", files={"content": ("a.png", png_bytes(12, 8), "image/png")}
    ).json()
    created = client.post("/v1/jobs", json={"image": stored["urls"]["get"], "scale": 2})
    assert created.status_code == 202, created.text
    assert created.json()["input"]["width"] == 12


def test_an_internal_url_is_refused_before_any_connection(client: TestClient) -> None:
    listener = _Listener()
    response = client.post(
        "/v1/jobs", json={"image": f"http://127.0.0.1:{listener.port}/x.png", "scale": 2}
    )
    assert _problem(response, 422)["title"] == "Image URL not allowed"
    assert listener.accepted() == 0


def test_unknown_and_invalid_fields_are_422(client: TestClient) -> None:
    image = data_uri(png_bytes())
    unknown = _problem(client.post("/v1/jobs", json={"image": image, "stpes": 3}), 422)
    assert "stpes" in str(unknown["detail"])
    bad_scale = _problem(client.post("/v1/jobs", json={"image": image, "scale": 3}), 422)
    assert "scale" in str(bad_scale["detail"])
    no_image = _problem(client.post("/v1/jobs", json={"scale": 2}), 422)
    assert "image" in str(no_image["detail"])
    assert _problem(client.post("/v1/jobs", json=[image]), 422)["title"] == "Invalid parameters"
    not_an_image = client.post("/v1/jobs", json={"image": data_uri(b"plain text")})
    assert _problem(not_an_image, 415)["title"] == "Unsupported image format"


@pytest.mark.parametrize("body", [b"{", b'{"image": "data:,"', b"\xff\xfe{}", b"[" * 100_000])
def test_malformed_json_is_400(client: TestClient, body: bytes) -> None:
    response = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert _problem(response, 400)["title"] == "Malformed JSON"


def test_other_content_types_are_415(client: TestClient) -> None:
    for content_type in ("text/plain", "application/xml", "image/png"):
        response = client.post("/v1/jobs", content=b"hello", headers={"Content-Type": content_type})
        assert _problem(response, 415)["title"] == "Unsupported Media Type", content_type
    # The form is still the form: its own checks answer.
    form = client.post("/v1/jobs", files={"image": ("a.png", png_bytes())}, data={"stpes": "3"})
    assert "stpes" in str(_problem(form, 422)["detail"])


def test_idempotency_key_replays_a_json_job(client: TestClient) -> None:
    body = {"image": data_uri(png_bytes()), "scale": 2}
    headers = {"Idempotency-Key": "json-once"}
    first = client.post("/v1/jobs", json=body, headers=headers)
    again = client.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"


def test_the_document_offers_both_bodies(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    content = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert content["application/json"]["schema"]["$ref"] == "#/components/schemas/JobCreateJson"
    schema = document["components"]["schemas"]["JobCreateJson"]
    assert "image" in schema["required"] and schema["additionalProperties"] is False
    assert {"scale", "webhook_url", "model"} <= set(schema["properties"])
    for reference in _references(schema):
        assert reference.removeprefix("#/components/schemas/") in document["components"]["schemas"]


def _references(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _references(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _references(value)]
    return []
