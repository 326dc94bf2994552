"""API keys, ownership, per-client rate limits, idempotency keys and queue-age backpressure."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from app.main import create_app
from app.security import hash_key
from core.settings import ApiKey, Settings
from tests.app.test_api_errors import _assert_problem, _nothing_left_behind, _post
from tests.conftest import png_bytes

ALICE, BOB, ADMIN = "alice-secret-key", "bob-secret-key", "admin-secret-key"


@pytest.fixture
def secured(settings: Settings) -> Iterator[TestClient]:
    settings.api.auth_required = True
    settings.api.keys = (
        ApiKey(name="alice", sha256=hash_key(ALICE)),
        ApiKey(name="bob", sha256=hash_key(BOB)),
        ApiKey(name="ops", sha256=hash_key(ADMIN), admin=True),
    )
    with TestClient(create_app(settings)) as client:
        yield client


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_missing_or_wrong_key_is_401(secured: TestClient, settings: Settings) -> None:
    response = _post(secured, png_bytes())
    _assert_problem(response, 401, "Missing or invalid API key")
    assert response.headers["www-authenticate"].startswith("Bearer")  # type: ignore[attr-defined]
    wrong = secured.post(
        "/v1/jobs", files={"image": ("a.png", png_bytes())}, headers=_as("not-a-key")
    )
    _assert_problem(wrong, 401, "Missing or invalid API key")
    _assert_problem(secured.get("/v1/jobs/x"), 401, "Missing or invalid API key")
    _nothing_left_behind(settings)
    assert secured.get("/healthz").status_code == 200  # probes need no key


def test_keys_only_see_their_own_jobs(secured: TestClient) -> None:
    created = secured.post(
        "/v1/jobs", files={"image": ("a.png", png_bytes())}, headers={"X-API-Key": ALICE}
    )
    assert created.status_code == 202
    job_id = created.json()["id"]
    assert secured.get(f"/v1/jobs/{job_id}", headers=_as(ALICE)).status_code == 200
    _assert_problem(secured.get(f"/v1/jobs/{job_id}", headers=_as(BOB)), 403, "Not allowed")
    _assert_problem(secured.delete(f"/v1/jobs/{job_id}", headers=_as(BOB)), 403, "Not allowed")
    _assert_problem(secured.get(f"/v1/jobs/{job_id}/result", headers=_as(BOB)), 403, "Not allowed")
    assert secured.get(f"/v1/jobs/{job_id}", headers=_as(ADMIN)).status_code == 200
    assert secured.delete(f"/v1/jobs/{job_id}", headers=_as(ADMIN)).json()["status"] == "canceled"


def test_keys_are_stored_hashed_in_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPASEMSR_API__KEYS", f'[{{"name": "svc", "sha256": "{hash_key("k1")}"}}]')
    settings = Settings()
    assert settings.api.keys[0].sha256 == hash_key("k1")
    with pytest.raises(ValueError):
        ApiKey(name="svc", sha256="k1")  # a raw key is refused: only the digest is stored


def test_rate_limit_per_key_is_429_with_retry_after(settings: Settings) -> None:
    settings.api.rate_limit_per_minute = 6  # one token every 10 s
    settings.api.rate_limit_burst = 2
    settings.api.keys = (
        ApiKey(name="alice", sha256=hash_key(ALICE)),
        ApiKey(name="bob", sha256=hash_key(BOB)),
    )
    with TestClient(create_app(settings)) as client:
        for _ in range(2):
            response = client.post(
                "/v1/jobs", files={"image": ("a.png", png_bytes())}, headers=_as(ALICE)
            )
            assert response.status_code == 202
        limited = client.post(
            "/v1/jobs", files={"image": ("a.png", png_bytes())}, headers=_as(ALICE)
        )
        _assert_problem(limited, 429, "Rate limit exceeded")
        assert 1 <= int(limited.headers["retry-after"]) <= 10
        other = client.post("/v1/jobs", files={"image": ("a.png", png_bytes())}, headers=_as(BOB))
        assert other.status_code == 202  # limits are per key
        assert client.get("/v1/jobs/unknown", headers=_as(ALICE)).status_code == 404  # polls free


def test_idempotency_key_returns_the_same_job(client_plain: TestClient, settings: Settings) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = _post_with(client_plain, png_bytes(), headers, scale="2")
    again = _post_with(client_plain, png_bytes(), headers, scale="2")
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    connection = Redis.from_url(settings.redis.url or "")
    assert connection.llen("rq:queue:spasemsr-lanczos-default") == 1  # queued once
    different = _post_with(client_plain, png_bytes(), headers, scale="4")
    _assert_problem(different, 422, "Idempotency key reused for a different request")
    other_key = _post_with(client_plain, png_bytes(), {"Idempotency-Key": "order-43"}, scale="2")
    assert other_key.json()["id"] != first.json()["id"]


def test_idempotency_key_of_a_request_still_in_flight_is_409(
    client_plain: TestClient, settings: Settings
) -> None:
    from core.jobs import JobParameters, Priority
    from core.limits import IdempotencyKeys, request_fingerprint

    keys = IdempotencyKeys(Redis.from_url(settings.redis.url or ""), prefix="spasemsr",
                           ttl_seconds=60)  # fmt: skip
    fingerprint = request_fingerprint(
        png_bytes(), JobParameters(model="lanczos", scale=2).model_dump_json(), Priority.DEFAULT
    )
    keys.claim("anonymous", "slow-1", job_id="not-created-yet", fingerprint=fingerprint)
    response = _post_with(client_plain, png_bytes(), {"Idempotency-Key": "slow-1"}, scale="2")
    _assert_problem(response, 409, "Idempotency key in use")


def test_a_rejected_request_releases_its_idempotency_key(
    client_plain: TestClient, settings: Settings
) -> None:
    settings.api.max_output_pixels = 10  # every job is too large
    rejected = _post_with(client_plain, png_bytes(), {"Idempotency-Key": "k"}, scale="2")
    assert rejected.status_code == 413
    settings.api.max_output_pixels = 10**8
    accepted = _post_with(client_plain, png_bytes(), {"Idempotency-Key": "k"}, scale="2")
    assert accepted.status_code == 202


def test_queue_older_than_the_limit_is_429(client_plain: TestClient, settings: Settings) -> None:
    settings.api.max_queue_age_seconds = 0.5
    assert _post(client_plain, png_bytes()).status_code == 202  # type: ignore[attr-defined]
    time.sleep(0.8)
    response = _post(client_plain, png_bytes())
    body = _assert_problem(response, 429, "Service overloaded")
    assert "oldest queued lanczos job" in str(body["detail"])


@pytest.fixture
def client_plain(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def _post_with(client: TestClient, data: bytes, headers: dict[str, str], **form: str):  # type: ignore[no-untyped-def]
    return client.post(
        "/v1/jobs", files={"image": ("a.png", data, "image/png")}, data=form, headers=headers
    )
