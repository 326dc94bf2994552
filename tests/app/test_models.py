"""Several models per service: choosing one, the default, listing, and refusing unserved ones.

The API runs in-process over a real Redis; the workers here are registry announcements (what a
live worker writes), so that the routes see exactly the fleet each test needs.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from app.main import create_app
from core.jobs import utcnow
from core.models import ModelName, default_model
from core.settings import Settings
from core.workers import ModelInfo, WorkerInfo, WorkerRegistry, WorkerState
from tests.conftest import png_bytes


def _info(name: ModelName, *, trained: bool, device: str = "cpu") -> ModelInfo:
    return ModelInfo(
        name=name,
        version="1",
        configuration="test",
        weights="test weights",
        trained=trained,
        device=device,
        dtype="float32",
        source="a test",
        licence="BSD-3-Clause",
    )


def _announce(
    settings: Settings, name: str, models: list[ModelInfo], state: WorkerState = WorkerState.IDLE
) -> None:
    registry = WorkerRegistry(Redis.from_url(settings.redis.url or ""), prefix="spasemsr")
    registry.announce(
        WorkerInfo(
            name=name,
            state=state,
            serving=tuple(m.name for m in models),
            models=[] if state is WorkerState.WARMING else models,
            pid=1,
            hostname="test",
            started_at=utcnow(),
        ),
        ttl_seconds=60,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    settings.model.default = ModelName.REALESRGAN_X4PLUS
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _post(client: TestClient, **form: str) -> dict[str, object]:
    response = client.post(
        "/v1/jobs", files={"image": ("a.png", png_bytes(), "image/png")}, data=form
    )
    assert response.status_code == 202, response.text
    body: dict[str, object] = response.json()
    return body


def test_a_request_without_a_model_gets_the_default(client: TestClient, settings: Settings) -> None:
    _announce(settings, "w1", [_info(ModelName.REALESRGAN_X4PLUS, trained=True)])
    job = _post(client, scale="4")
    assert job["model"] == "realesrgan-x4plus"
    assert job["model_trained"] is True
    assert job["warnings"] == []
    connection = Redis.from_url(settings.redis.url or "")
    assert connection.llen("rq:queue:spasemsr-realesrgan-x4plus-default") == 1
    assert client.get(f"/v1/jobs/{job['id']}").json()["queue_position"] == 0


def test_a_named_model_goes_to_its_own_queue_and_untrained_weights_are_said(
    client: TestClient, settings: Settings
) -> None:
    _announce(
        settings,
        "w1",
        [
            _info(ModelName.REALESRGAN_X4PLUS, trained=True),
            _info(ModelName.SPASEMSR, trained=False),
        ],
    )
    job = _post(client, model="spasemsr", priority="high")
    assert job["model"] == "spasemsr" and job["model_trained"] is False
    assert any("untrained" in str(w) for w in job["warnings"])  # type: ignore[attr-defined]
    connection = Redis.from_url(settings.redis.url or "")
    assert connection.llen("rq:queue:spasemsr-spasemsr-high") == 1
    assert connection.llen("rq:queue:spasemsr-realesrgan-x4plus-high") == 0


def test_a_model_no_worker_serves_is_422_naming_the_served_ones(
    client: TestClient, settings: Settings
) -> None:
    _announce(settings, "w1", [_info(ModelName.LANCZOS, trained=True)])
    response = client.post(
        "/v1/jobs",
        files={"image": ("a.png", png_bytes(), "image/png")},
        data={"model": "spasemsr"},
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["title"] == "Model not served"
    assert body["served"] == ["lanczos", "realesrgan-x4plus"]
    assert "spasemsr" in body["detail"]
    assert list(Redis.from_url(settings.redis.url or "").scan_iter("spasemsr:job:*")) == []


def test_an_unknown_model_name_is_422(client: TestClient) -> None:
    response = client.post(
        "/v1/jobs",
        files={"image": ("a.png", png_bytes(), "image/png")},
        data={"model": "dall-e"},
    )
    assert response.status_code == 422
    assert "model" in response.json()["detail"]


def test_a_model_on_a_warming_worker_is_accepted(client: TestClient, settings: Settings) -> None:
    _announce(settings, "w1", [_info(ModelName.SPASEMSR, trained=False)], WorkerState.WARMING)
    job = _post(client, model="spasemsr")
    assert job["model"] == "spasemsr" and job["model_trained"] is None


def test_models_lists_each_served_model_once_with_its_facts(
    client: TestClient, settings: Settings
) -> None:
    _announce(settings, "w1", [_info(ModelName.REALESRGAN_X4PLUS, trained=True, device="cuda:0")])
    _announce(
        settings,
        "w2",
        [
            _info(ModelName.REALESRGAN_X4PLUS, trained=True, device="cuda:1"),
            _info(ModelName.SPASEMSR, trained=False, device="cuda:1"),
        ],
    )
    listing = client.get("/v1/models").json()
    assert listing["default"] == "realesrgan-x4plus"
    by_name = {m["name"]: m for m in listing["models"]}
    assert list(by_name) == ["spasemsr", "realesrgan-x4plus"]  # catalogue order
    esrgan = by_name["realesrgan-x4plus"]
    assert esrgan["workers"] == 2 and esrgan["default"] is True
    assert esrgan["devices"] == ["cuda:0", "cuda:1"]
    assert esrgan["licence"] == "BSD-3-Clause" and esrgan["scales"] == [2, 4]
    assert by_name["spasemsr"]["warnings"] and by_name["realesrgan-x4plus"]["warnings"] == []
    # The single-model route of earlier clients answers with the default model.
    assert client.get("/v1/model").json()["name"] == "realesrgan-x4plus"


def test_the_embedded_default_is_the_trained_real_esrgan(settings: Settings) -> None:
    settings.model.default = None
    assert default_model(settings) is ModelName.REALESRGAN_X4PLUS
    settings.model.path = settings.var_dir / "trained-spasemsr"
    assert default_model(settings) is ModelName.SPASEMSR


def test_a_full_queue_of_one_model_does_not_refuse_another_model(
    client: TestClient, settings: Settings
) -> None:
    settings.api.max_queue_depth = 2
    _announce(
        settings,
        "w1",
        [_info(ModelName.REALESRGAN_X4PLUS, trained=True), _info(ModelName.LANCZOS, trained=True)],
    )
    for _ in range(2):
        _post(client, model="lanczos")
    refused = client.post(
        "/v1/jobs",
        files={"image": ("a.png", png_bytes(), "image/png")},
        data={"model": "lanczos"},
    )
    assert refused.status_code == 429 and refused.headers["retry-after"]
    assert "lanczos" in refused.json()["detail"]
    assert _post(client)["model"] == "realesrgan-x4plus"
