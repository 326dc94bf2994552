"""Every error status of the v1 contract, as problem+json, against a real Redis and storage.

The API runs in-process here (httpx over ASGI); the end-to-end tests run it under uvicorn.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis

from app.main import create_app
from core.embedded_redis import EmbeddedRedis
from core.jobs import JobStatus
from core.records import JobStore
from core.settings import Settings
from tests.conftest import encode, png_bytes


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    settings.api.max_upload_bytes = 200_000
    settings.api.max_input_pixels = 256 * 256
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _assert_problem(response: object, status: int, title: str) -> dict[str, object]:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    assert response.headers["content-type"] == "application/problem+json"  # type: ignore[attr-defined]
    body: dict[str, object] = response.json()  # type: ignore[attr-defined]
    assert body["status"] == status
    assert body["title"] == title
    assert str(body["type"]).startswith("https://")
    assert "Traceback" not in response.text  # type: ignore[attr-defined]
    return body


def _nothing_left_behind(settings: Settings) -> None:
    connection = Redis.from_url(settings.redis.url or "")
    assert list(connection.scan_iter("spasemsr:job:*")) == []
    for priority in ("high", "default", "low"):
        assert connection.llen(f"rq:queue:spasemsr-lanczos-{priority}") == 0
    storage = settings.storage_root()
    assert not storage.exists() or not any(p.is_file() for p in storage.rglob("*"))


def _post(client: TestClient, data: bytes, name: str = "a.png", **form: str) -> object:
    return client.post("/v1/jobs", files={"image": (name, data, "image/png")}, data=form)


def test_accepted_upload_is_queued_with_location(client: TestClient, settings: Settings) -> None:
    response = _post(client, png_bytes(), scale="2", steps="5", tags="sky, sea")
    assert response.status_code == 202  # type: ignore[attr-defined]
    job = response.json()  # type: ignore[attr-defined]
    location = response.headers["location"]  # type: ignore[attr-defined]
    assert location == f"http://testserver/v1/jobs/{job['id']}"  # absolute
    assert job["status"] == "queued"
    assert job["queue_position"] == 0
    assert job["input"] == {"width": 24, "height": 16, "format": "png", "bytes": len(png_bytes())}
    assert job["parameters"]["tags"] == ["sky", "sea"]
    assert (settings.storage_root() / "inputs" / job["id"]).is_file()
    again = client.get(job["links"]["self"]).json()
    assert again["id"] == job["id"] and again["status"] == "queued"


@pytest.mark.parametrize(
    ("payload", "status", "title"),
    [
        (b"", 415, "Unsupported image format"),
        (b"hello, I am text, not an image", 415, "Unsupported image format"),
        (b"GIF89a" + b"\x00" * 40, 415, "Unsupported image format"),
        (png_bytes()[:60], 422, "Image cannot be decoded"),
        (png_bytes()[:-30], 422, "Image cannot be decoded"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, 422, "Image cannot be decoded"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 50, 422, "Image cannot be decoded"),
    ],
    ids=[
        "empty",
        "text",
        "gif",
        "truncated-header",
        "truncated-data",
        "png-garbage",
        "jpeg-garbage",
    ],
)
def test_bad_images_are_refused_and_leave_nothing(
    client: TestClient, settings: Settings, payload: bytes, status: int, title: str
) -> None:
    _assert_problem(_post(client, payload), status, title)
    _nothing_left_behind(settings)


def test_the_content_type_claimed_by_the_client_is_not_trusted(client: TestClient) -> None:
    jpeg = encode(Image.new("RGB", (10, 10), "red"), "JPEG")
    response = client.post("/v1/jobs", files={"image": ("x.gif", jpeg, "image/gif")})
    assert response.status_code == 202
    assert response.json()["input"]["format"] == "jpeg"
    text = client.post("/v1/jobs", files={"image": ("x.png", b"not really", "image/png")})
    _assert_problem(text, 415, "Unsupported image format")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_each_supported_format_is_accepted(client: TestClient, fmt: str) -> None:
    response = _post(client, encode(Image.new("RGB", (8, 6), "blue"), fmt))
    assert response.status_code == 202  # type: ignore[attr-defined]
    assert response.json()["input"]["format"] == fmt.lower()  # type: ignore[attr-defined]


def test_over_the_byte_cap_is_413(client: TestClient, settings: Settings) -> None:
    big = png_bytes(4, 4) + b"\x00" * 250_000  # valid header, padded past the cap
    _assert_problem(_post(client, big), 413, "Upload too large")
    _nothing_left_behind(settings)


def test_byte_cap_holds_for_a_chunked_body_without_length(
    client: TestClient, settings: Settings
) -> None:
    boundary = "XyZ"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(100):  # 100 x 64 KiB = 6.4 MB, far past the cap
            yield b"\x00" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/v1/jobs",
        content=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    _assert_problem(response, 413, "Upload too large")
    _nothing_left_behind(settings)


def test_declared_length_over_the_cap_is_refused_before_reading(client: TestClient) -> None:
    response = client.post(
        "/v1/jobs",
        content=b"x" * 10,
        headers={"Content-Type": "multipart/form-data; boundary=a", "Content-Length": "999999999"},
    )
    _assert_problem(response, 413, "Upload too large")


def test_over_the_pixel_cap_is_413_from_the_header(client: TestClient, settings: Settings) -> None:
    # 300x300 > 256x256 cap; a flat image compresses to a few hundred bytes.
    _assert_problem(_post(client, encode(Image.new("L", (300, 300)), "PNG")), 413,
                    "Image has too many pixels")  # fmt: skip
    _nothing_left_behind(settings)


def test_decompression_bomb_header_is_413(client: TestClient) -> None:
    # A PNG whose header claims 100000 x 100000 pixels, with almost no data behind it.
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    _assert_problem(_post(client, bomb), 413, "Image has too many pixels")


def test_output_pixel_cap(client: TestClient, settings: Settings) -> None:
    settings.api.max_output_pixels = 1000
    body = _assert_problem(_post(client, png_bytes(24, 16), scale="4"), 413,
                           "Image has too many pixels")  # fmt: skip
    assert "scale 4" in str(body["detail"])


@pytest.mark.parametrize(
    ("form", "field"),
    [
        ({"scale": "3"}, "scale"),
        ({"steps": "0"}, "steps"),
        ({"steps": "many"}, "steps"),
        ({"guidance_scale": "99"}, "guidance_scale"),
        ({"color_fix": "sepia"}, "color_fix"),
        ({"output_format": "gif"}, "output_format"),
        ({"priority": "urgent"}, "priority"),
        ({"tile_size": "100"}, "tile_size"),
        ({"seed": "-4"}, "seed"),
        ({"stpes": "4"}, "stpes"),
    ],
)
def test_bad_parameters_are_422(
    client: TestClient, settings: Settings, form: dict[str, str], field: str
) -> None:
    body = _assert_problem(_post(client, png_bytes(), **form), 422, "Invalid parameters")
    assert field in str(body["detail"])
    _nothing_left_behind(settings)


def test_missing_image_is_422(client: TestClient) -> None:
    _assert_problem(client.post("/v1/jobs", data={"scale": "2"}), 422, "Invalid parameters")


def test_unknown_job_is_404_everywhere(client: TestClient) -> None:
    for method, path in [
        ("GET", "/v1/jobs/nope"),
        ("GET", "/v1/jobs/nope/result"),
        ("DELETE", "/v1/jobs/nope"),
        ("POST", "/v1/jobs/nope/cancel"),
    ]:
        _assert_problem(client.request(method, path), 404, "Job not found")


def test_unknown_route_and_method_are_problems(client: TestClient) -> None:
    _assert_problem(client.get("/v2/anything"), 404, "Not Found")
    _assert_problem(client.put("/v1/jobs"), 405, "Method Not Allowed")


def test_result_before_success_is_409(client: TestClient) -> None:
    job = _post(client, png_bytes()).json()  # type: ignore[attr-defined]
    body = _assert_problem(client.get(f"/v1/jobs/{job['id']}/result"), 409, "Job has not succeeded")
    assert "queued" in str(body["detail"])


def test_a_result_missing_from_storage_is_410_not_500(
    client: TestClient, settings: Settings
) -> None:
    from core.jobs import ImageFormat, ImageInfo

    job = _post(client, png_bytes()).json()  # type: ignore[attr-defined]
    jobs = JobStore(Redis.from_url(settings.redis.url or ""), prefix="spasemsr", ttl_seconds=60)
    output = ImageInfo(width=96, height=64, format=ImageFormat.PNG, bytes=10)
    assert jobs.transition(job["id"], from_statuses=[JobStatus.QUEUED], to=JobStatus.SUCCEEDED,
                           output=output)  # fmt: skip
    # The worker would have written results/<id>.png; a lifecycle rule or a person deleted it.
    body = _assert_problem(
        client.get(f"/v1/jobs/{job['id']}/result"), 410, "Result no longer available"
    )
    assert "submit it again" in str(body["detail"])


def test_cancel_queued_job_at_once_then_409(client: TestClient, settings: Settings) -> None:
    job = _post(client, png_bytes()).json()  # type: ignore[attr-defined]
    canceled = client.delete(f"/v1/jobs/{job['id']}")
    assert canceled.status_code == 200
    assert canceled.json()["status"] == "canceled"
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "canceled"
    assert not (settings.storage_root() / "inputs" / job["id"]).exists()
    assert Redis.from_url(settings.redis.url or "").llen("rq:queue:spasemsr-lanczos-default") == 0
    _assert_problem(client.delete(f"/v1/jobs/{job['id']}"), 409, "Job already finished")


def test_cancel_of_running_job_sets_the_flag(client: TestClient, settings: Settings) -> None:
    job = _post(client, png_bytes()).json()  # type: ignore[attr-defined]
    store = JobStore(Redis.from_url(settings.redis.url or ""), prefix="spasemsr", ttl_seconds=60)
    assert store.transition(job["id"], from_statuses=[JobStatus.QUEUED], to=JobStatus.PROCESSING)
    response = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "processing"  # it stops at its next step
    assert store.cancel_requested(job["id"])


def test_full_queue_is_429_with_retry_after(client: TestClient, settings: Settings) -> None:
    settings.api.max_queue_depth = 2
    settings.api.retry_after_seconds = 7
    for _ in range(2):
        assert _post(client, png_bytes()).status_code == 202  # type: ignore[attr-defined]
    response = _post(client, png_bytes())
    _assert_problem(response, 429, "Service overloaded")
    assert response.headers["retry-after"] == "7"  # type: ignore[attr-defined]


def test_no_warm_worker_means_not_ready_and_no_model(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    body = _assert_problem(client.get("/readyz"), 503, "Not ready")
    assert body["checks"] == {
        "redis": "ok",
        "storage": "ok",
        "workers": "no warm worker",
        "default_model": "lanczos not warm",
    }
    _assert_problem(client.get("/v1/model"), 503, "Dependency unavailable")


def test_redis_down_is_503(redis_server: EmbeddedRedis, settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        redis_server.stop()
        _assert_problem(_post(client, png_bytes()), 503, "Job queue unavailable")
        _assert_problem(client.get("/v1/jobs/abc"), 503, "Job queue unavailable")
        body = _assert_problem(client.get("/readyz"), 503, "Not ready")
        assert str(body["checks"]["redis"]).startswith("unavailable")  # type: ignore[index]


def test_storage_down_is_503(settings: Settings, tmp_path: Path) -> None:
    settings.storage.backend = "s3"
    settings.storage.s3_endpoint_url = "http://127.0.0.1:9"
    with TestClient(create_app(settings)) as client:
        _assert_problem(_post(client, png_bytes()), 503, "Object storage unavailable")
        _nothing_left_behind(settings)


def test_openapi_documents_the_contract(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ["/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result", "/v1/model",
                 "/healthz", "/readyz"]:  # fmt: skip
        assert path in spec["paths"]
    assert client.get("/docs").status_code == 200
    form = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in form
