"""The whole service as separate processes: uvicorn API, worker(s), redis-server, storage."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import numpy as np
import pytest
from PIL import Image

from core.embedded_redis import EmbeddedRedis
from tests.conftest import ServiceProcesses, encode, png_bytes, start_service, wait_for_status


@pytest.fixture
def lanczos_service(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[ServiceProcesses]:
    service = start_service(
        redis_server.url,
        tmp_path,
        SPASEMSR_WORKER__MODELS='["lanczos"]',
        SPASEMSR_MODEL__DEFAULT="lanczos",
    )
    yield service
    service.stop()


@pytest.mark.parametrize(
    ("scale", "output_format", "size"),
    [(2, "png", (31, 17)), (4, "webp", (16, 9)), (4, "jpeg", (7, 5))],
)
def test_upload_poll_download(
    lanczos_service: ServiceProcesses, scale: int, output_format: str, size: tuple[int, int]
) -> None:
    with httpx.Client(base_url=lanczos_service.url, timeout=30) as client:
        created = client.post(
            "/v1/jobs",
            files={"image": ("in.png", png_bytes(*size), "image/png")},
            data={"scale": str(scale), "output_format": output_format},
        )
        assert created.status_code == 202, created.text
        job = wait_for_status(client, created.json()["id"], {"succeeded", "failed"})
        assert job["status"] == "succeeded", job
        result = client.get(f"/v1/jobs/{job['id']}/result")
        assert result.status_code == 200
        assert result.headers["content-type"] == f"image/{output_format}"
        image = Image.open(io.BytesIO(result.content))
        assert image.format == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[output_format]
        assert image.size == (size[0] * scale, size[1] * scale)
        assert job["output"] == {
            "width": size[0] * scale,
            "height": size[1] * scale,
            "format": output_format,
            "bytes": len(result.content),
        }
        timings = job["timings"]
        assert isinstance(timings, dict)
        assert {"queue_wait", "read", "upscale", "write", "total"} <= set(timings)
        assert job["started_at"] and job["finished_at"]
        assert job["queue_position"] is None


def test_model_and_readiness(lanczos_service: ServiceProcesses) -> None:
    ready = httpx.get(lanczos_service.url + "/readyz").json()
    assert ready["checks"] == {
        "redis": "ok",
        "storage": "ok",
        "workers": "ok",
        "default_model": "ok",
    }
    model = httpx.get(lanczos_service.url + "/v1/model").json()
    assert model["name"] == "lanczos"
    assert model["workers"] == 1


def test_jobs_wait_in_line_while_no_worker_runs(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    service = start_service(
        redis_server.url,
        tmp_path,
        workers=0,
        SPASEMSR_WORKER__MODELS='["lanczos"]',
        SPASEMSR_MODEL__DEFAULT="lanczos",
    )
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            ids = []
            for priority in ("low", "default", "high"):
                response = client.post(
                    "/v1/jobs",
                    files={"image": ("a.png", png_bytes(), "image/png")},
                    data={"priority": priority, "scale": "2"},
                )
                ids.append(response.json()["id"])
            positions = [client.get(f"/v1/jobs/{i}").json()["queue_position"] for i in ids]
            assert positions == [2, 1, 0]  # high first, then default, then low
            service.start_worker()
            for job_id in ids:
                assert wait_for_status(client, job_id, {"succeeded"})["status"] == "succeeded"
    finally:
        service.stop()


def test_s3_backend_end_to_end_with_presigned_redirect(
    redis_server: EmbeddedRedis, tmp_path: Path, s3_env: dict[str, str], s3_endpoint: str
) -> None:
    service = start_service(
        redis_server.url,
        tmp_path,
        workers=1,
        SPASEMSR_WORKER__MODELS='["lanczos"]',
        SPASEMSR_MODEL__DEFAULT="lanczos",
        SPASEMSR_API__RESULT_DELIVERY="redirect",
        **s3_env,
    )
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            jpeg = encode(Image.new("RGB", (12, 10), "orange"), "JPEG")
            created = client.post("/v1/jobs", files={"image": ("a.jpg", jpeg, "image/jpeg")})
            job = wait_for_status(client, created.json()["id"], {"succeeded", "failed"})
            assert job["status"] == "succeeded", job
            redirect = client.get(f"/v1/jobs/{job['id']}/result")
            assert redirect.status_code == 307
            assert redirect.headers["location"].startswith(s3_endpoint)
            result = httpx.get(redirect.headers["location"])
            assert Image.open(io.BytesIO(result.content)).size == (48, 40)
        s3 = boto3.client(
            "s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
            aws_secret_access_key="testing", region_name="us-east-1",
        )  # fmt: skip
        keys = {
            o["Key"]
            for o in s3.list_objects_v2(Bucket=s3_env["SPASEMSR_STORAGE__S3_BUCKET"])["Contents"]
        }
        assert keys == {f"results/{job['id']}.png"}  # the input is removed once the job is done
    finally:
        service.stop()


@pytest.fixture(scope="module")
def spasemsr_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcesses]:
    """A worker with the embedded default model (Real-ESRGAN x4plus, trained) and the SpaSemSR
    pipeline (tiny demo weights) with its grounder; no default configured."""
    import tempfile

    redis = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="ssr-e2e-")), appendonly=False).start()
    service = start_service(
        redis.url,
        tmp_path_factory.mktemp("spasemsr"),
        SPASEMSR_MODEL__CPU_THREADS="1",
        SPASEMSR_WORKER__MODELS='["spasemsr", "realesrgan-x4plus"]',
    )
    yield service
    service.stop()
    redis.stop()


def test_a_photo_with_no_parameters_gets_a_real_result(spasemsr_service: ServiceProcesses) -> None:
    """The first thing a new user does: a real photograph, nothing but the image."""
    from model.evaluation.photos import load_photo

    original = load_photo("chelsea")  # scikit-image's cat, 451 x 300
    small = original.resize(
        (128, round(128 * original.height / original.width)), Image.Resampling.BICUBIC
    )
    with httpx.Client(base_url=spasemsr_service.url, timeout=60) as client:
        model = client.get("/v1/model").json()
        assert (model["name"], model["trained"], model["licence"]) == (
            "realesrgan-x4plus",
            True,
            "BSD-3-Clause",
        )
        created = client.post("/v1/jobs", files={"image": ("chelsea.png", encode(small, "PNG"))})
        assert created.status_code == 202, created.text
        assert created.json()["model"] == "realesrgan-x4plus"
        job = wait_for_status(client, created.json()["id"], {"succeeded", "failed"}, 300)
        assert job["status"] == "succeeded", job
        assert job["model_trained"] is True and job["warnings"] == []
        result = Image.open(io.BytesIO(client.get(f"/v1/jobs/{job['id']}/result").content))
    assert result.size == (512, small.height * 4)
    reference = np.asarray(original.resize(result.size, Image.Resampling.LANCZOS), dtype=np.float64)
    error = np.mean((np.asarray(result.convert("RGB"), dtype=np.float64) - reference) ** 2)
    # The untrained pipeline scored 12.6-16.4 dB here (noise); a real restoration is far above.
    assert 10 * np.log10(255**2 / error) > 24


def test_spasemsr_job_end_to_end(spasemsr_service: ServiceProcesses) -> None:
    with httpx.Client(base_url=spasemsr_service.url, timeout=60) as client:
        listing = client.get("/v1/models").json()
        spasemsr = next(m for m in listing["models"] if m["name"] == "spasemsr")
        assert (spasemsr["configuration"], spasemsr["trained"]) == ("tiny", False)
        assert spasemsr["warnings"] and "untrained" in spasemsr["warnings"][0]
        created = client.post(
            "/v1/jobs",
            files={"image": ("in.png", png_bytes(23, 17), "image/png")},
            data={"model": "spasemsr", "scale": "4", "steps": "3", "seed": "7", "tags": "sky, sea"},
        )
        assert created.status_code == 202, created.text
        job = wait_for_status(client, created.json()["id"], {"succeeded", "failed"}, 180)
        assert job["status"] == "succeeded", job
        assert job["model"] == "spasemsr" and job["model_trained"] is False
        warnings = job["warnings"]
        assert isinstance(warnings, list)
        assert any("untrained" in warning for warning in warnings)
        result = client.get(f"/v1/jobs/{job['id']}/result")
        assert Image.open(io.BytesIO(result.content)).size == (92, 68)
        timings = job["timings"]
        assert isinstance(timings, dict)
        assert {"grounding", "encode", "denoise", "decode", "upscale", "total"} <= set(timings)
        grounding = job["grounding"]
        assert isinstance(grounding, dict)
        assert len(grounding["tags"]) == len(grounding["boxes"])
        assert {"sky", "sea"} <= set(grounding["tags"])
        assert grounding["caption"]
        assert all(0 <= v <= 1 for box in grounding["boxes"] for v in box)


def test_spasemsr_running_job_is_canceled_at_its_next_step(
    spasemsr_service: ServiceProcesses,
) -> None:
    with httpx.Client(base_url=spasemsr_service.url, timeout=60) as client:
        created = client.post(
            "/v1/jobs",
            files={"image": ("in.png", png_bytes(32, 32), "image/png")},
            data={"model": "spasemsr", "scale": "4", "steps": "100"},
        )
        job_id = created.json()["id"]
        deadline = time.monotonic() + 180
        while True:
            job = client.get(f"/v1/jobs/{job_id}").json()
            progress = job["progress"]
            if progress["stage"] == "denoise" and progress["step"] >= 1:
                assert progress["total"] == 100
                break
            assert job["status"] in {"queued", "processing"}, job
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
        job = wait_for_status(client, job_id, {"canceled", "succeeded", "failed"}, 60)
        assert job["status"] == "canceled", job
        error, progress = job["error"], job["progress"]
        assert isinstance(error, dict) and isinstance(progress, dict)
        assert error["type"] == "job-canceled"
        assert progress["stage"] == "canceled"
        # The worker is free again: the next job runs.
        after = client.post(
            "/v1/jobs",
            files={"image": ("in.png", png_bytes(8, 8), "image/png")},
            data={"scale": "2", "steps": "2"},
        )
        assert wait_for_status(client, after.json()["id"], {"succeeded"}, 120)["status"] == (
            "succeeded"
        )
