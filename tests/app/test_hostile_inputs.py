"""A generated corpus of hostile and odd uploads: each is handled correctly or refused with a
clear 4xx problem, never a 500, and every accepted one is processed by the worker."""

from __future__ import annotations

import io
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image, ImageCms
from redis import Redis

from app.main import create_app
from core.embedded_redis import EmbeddedRedis
from core.jobs import JobPayload, JobStatus
from core.models import ModelName
from core.records import JobStore
from core.settings import Settings
from core.storage import LocalStorage
from core.workers import WorkerRegistry
from model.upscalers.lanczos import LanczosUpscaler
from tests.conftest import encode, png_bytes, start_service
from worker.runtime import WorkerRuntime
from worker.tasks import JobRunner


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_with_chunk(kind: bytes, data: bytes) -> bytes:
    base = png_bytes(8, 8)
    return base[:33] + _chunk(kind, data) + base[33:]  # after the 8-byte magic + IHDR (25)


def _gradient(mode: str, size: tuple[int, int]) -> Image.Image:
    return Image.linear_gradient("L").resize(size).convert(mode)


def _rgba() -> Image.Image:
    image = _gradient("RGB", (12, 10)).convert("RGBA")
    alpha = Image.new("L", (12, 10), 0)
    alpha.paste(255, (0, 0, 6, 10))  # left half opaque, right half transparent
    image.putalpha(alpha)
    return image


def _palette_with_transparency() -> bytes:
    image = _gradient("RGB", (10, 10)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0)
    return buffer.getvalue()


def _exif_rotated_jpeg() -> bytes:
    image = _gradient("RGB", (20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def _with_icc(profile: bytes) -> bytes:
    buffer = io.BytesIO()
    _gradient("RGB", (9, 9)).save(buffer, format="PNG", icc_profile=profile)
    return buffer.getvalue()


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (8, 8), color) for color in ("red", "green", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=50)
    return buffer.getvalue()


def _sixteen_bit_gray() -> bytes:
    image = Image.new("I;16", (10, 6))
    image.putdata([i * 1000 for i in range(60)])
    return encode(image, "PNG")


Accepted = tuple[int, int, str]  # expected output width, height, mode at scale 2


def _accepted(width: int, height: int, mode: str) -> Accepted:
    return (width * 2, height * 2, mode)


CORPUS: dict[str, tuple[Callable[[], bytes], Accepted | int]] = {
    "cmyk-jpeg": (lambda: encode(_gradient("CMYK", (10, 8)), "JPEG"), _accepted(10, 8, "RGB")),
    "grayscale-png": (lambda: encode(_gradient("L", (7, 9)), "PNG"), _accepted(7, 9, "L")),
    "16-bit-png": (_sixteen_bit_gray, _accepted(10, 6, "L")),
    "palette-transparency": (_palette_with_transparency, _accepted(10, 10, "RGBA")),
    "rgba-png": (lambda: encode(_rgba(), "PNG"), _accepted(12, 10, "RGBA")),
    "rgba-webp": (lambda: encode(_rgba(), "WEBP"), _accepted(12, 10, "RGBA")),
    "exif-orientation": (_exif_rotated_jpeg, _accepted(10, 20, "RGB")),
    "srgb-icc": (
        lambda: _with_icc(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()),
        _accepted(9, 9, "RGB"),
    ),
    "broken-icc": (lambda: _with_icc(b"not an icc profile" * 10), _accepted(9, 9, "RGB")),
    "one-pixel": (lambda: encode(Image.new("RGB", (1, 1), "white"), "PNG"), _accepted(1, 1, "RGB")),
    "extreme-aspect": (lambda: png_bytes(1, 300), _accepted(1, 300, "RGB")),
    "animated-png": (lambda: _animated("PNG"), _accepted(8, 8, "RGB")),
    "animated-webp": (lambda: _animated("WEBP"), _accepted(8, 8, "RGB")),
    "png-zip-polyglot": (lambda: png_bytes(6, 6) + b"PK\x03\x04" + b"\x00" * 100, _accepted(6, 6, "RGB")),  # noqa: E501
    "jpeg-html-polyglot": (
        lambda: encode(_gradient("RGB", (8, 8)), "JPEG") + b"<html><script>x()</script></html>",
        _accepted(8, 8, "RGB"),
    ),
    "png-magic-jpeg-body": (lambda: b"\x89PNG\r\n\x1a\n" + encode(Image.new("RGB", (8, 8)), "JPEG")[3:], 422),  # noqa: E501
    "ztxt-bomb": (lambda: _png_with_chunk(b"zTXt", b"bomb\x00\x00" + zlib.compress(b"A" * 64_000_000, 9)), 422),  # noqa: E501
    "iccp-bomb": (lambda: _png_with_chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(b"\x00" * 64_000_000, 9)), 422),  # noqa: E501
    "truncated-jpeg": (lambda: encode(_gradient("RGB", (30, 30)), "JPEG")[:200], 422),
    "truncated-webp": (lambda: encode(_gradient("RGB", (30, 30)), "WEBP")[:40], 422),
    "webp-riff-only": (lambda: b"RIFF\x10\x00\x00\x00WEBPVP8 ", 422),
}  # fmt: skip


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    settings.api.rate_limit_per_minute = 0
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def runtime(settings: Settings) -> WorkerRuntime:
    connection = Redis.from_url(settings.redis.url or "")
    return WorkerRuntime(
        settings=settings,
        name="hostile-worker",
        upscalers={ModelName.LANCZOS: LanczosUpscaler()},
        storage=LocalStorage(settings.storage_root()),
        jobs=JobStore(connection, prefix="spasemsr", ttl_seconds=600),
        registry=WorkerRegistry(connection, prefix="spasemsr"),
        warmup_seconds=0.0,
    )


def _run_on_worker(runtime: WorkerRuntime, job_id: str) -> None:
    record = runtime.jobs.get(job_id)
    payload = JobPayload(
        job_id=record.id,
        input_key=record.input_key,
        output_key=record.output_key,
        input=record.input,
        parameters=record.parameters,
    )
    JobRunner(runtime, payload).run()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_hostile_corpus(
    name: str, client: TestClient, runtime: WorkerRuntime, settings: Settings
) -> None:
    make, expected = CORPUS[name]
    began = time.perf_counter()
    response = client.post(
        "/v1/jobs", files={"image": ("upload", make(), "application/octet-stream")},
        data={"scale": "2"},
    )  # fmt: skip
    assert time.perf_counter() - began < 10, "an upload check must never hang"
    if isinstance(expected, int):
        assert response.status_code == expected, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert not any(p.is_file() for p in settings.storage_root().rglob("*"))
        return
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["input"]["width"] * 2, job["input"]["height"] * 2) == expected[:2]
    _run_on_worker(runtime, job["id"])
    record = runtime.jobs.get(job["id"])
    assert record.status is JobStatus.SUCCEEDED, record.error
    result = Image.open(io.BytesIO(client.get(f"/v1/jobs/{job['id']}/result").content))
    assert (result.width, result.height, result.mode) == expected


def test_alpha_is_upscaled_separately_and_kept(client: TestClient, runtime: WorkerRuntime) -> None:
    job = client.post(
        "/v1/jobs", files={"image": ("a.png", encode(_rgba(), "PNG"))}, data={"scale": "4"}
    ).json()
    _run_on_worker(runtime, job["id"])
    result = Image.open(io.BytesIO(client.get(f"/v1/jobs/{job['id']}/result").content))
    alpha = result.getchannel("A")
    assert alpha.getpixel((2, 20)) == 255 and alpha.getpixel((45, 20)) == 0
    flattened = client.post(
        "/v1/jobs", files={"image": ("a.png", encode(_rgba(), "PNG"))},
        data={"scale": "2", "output_format": "jpeg"},
    ).json()  # fmt: skip
    _run_on_worker(runtime, flattened["id"])
    jpeg = Image.open(io.BytesIO(client.get(f"/v1/jobs/{flattened['id']}/result").content))
    assert jpeg.mode == "RGB"
    pixel = jpeg.getpixel((22, 10))
    assert isinstance(pixel, tuple)
    assert min(pixel) > 240  # the transparent half became white


def test_slow_upload_gets_408(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    """A client that stops sending mid-body is cut off (needs a real server: real sockets)."""
    service = start_service(
        redis_server.url, tmp_path, workers=0, SPASEMSR_API__UPLOAD_IDLE_TIMEOUT_SECONDS="2"
    )
    try:
        head = (
            b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="a"\r\n\r\n'
        )
        with socket.create_connection(("127.0.0.1", service.port), timeout=60) as conn:
            conn.sendall(head + b"\x89PNG")  # ...and then nothing more
            began = time.monotonic()
            answer = b""
            while chunk := conn.recv(65536):  # the server closes the connection after it
                answer += chunk
        assert time.monotonic() - began < 45  # cut off, not left hanging
        text = answer.decode(errors="replace")
        assert text.startswith("HTTP/1.1 408"), text
        assert "Upload too slow" in text
    finally:
        service.stop()


def test_many_parts_and_oversized_fields_are_4xx(client: TestClient) -> None:
    many = {f"field{i}": "x" for i in range(1500)}
    response = client.post("/v1/jobs", files={"image": ("a.png", png_bytes())}, data=many)
    assert 400 <= response.status_code < 500
    assert response.headers["content-type"] == "application/problem+json"
    huge_field = client.post(
        "/v1/jobs", files={"image": ("a.png", png_bytes())}, data={"caption": "x" * 2_000_000}
    )
    assert 400 <= huge_field.status_code < 500


@hypothesis_settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    prefix=st.sampled_from(
        [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBP"]
    ),
    body=st.binary(max_size=2048),
    cut=st.integers(min_value=0, max_value=400),
)
def test_arbitrary_bytes_never_cause_a_server_error(
    client: TestClient, prefix: bytes, body: bytes, cut: int
) -> None:
    valid = png_bytes(5, 5)
    for payload in (prefix + body, valid[:cut] + body[:16]):
        response = client.post("/v1/jobs", files={"image": ("x", payload)})
        assert response.status_code < 500, response.text
        if response.status_code != 202:
            assert response.headers["content-type"] == "application/problem+json"
