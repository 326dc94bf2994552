"""The Replicate-compatible routes: the official client against a live service, SSRF refusals
of image URLs, files, listing and the model's input schema."""

from __future__ import annotations

import base64
import datetime
import io
import ipaddress
import socket
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from PIL import Image
from replicate.client import Client as ReplicateClient
from replicate.helpers import FileOutput
from skimage import data as skdata

from app.main import create_app
from app.security import hash_key
from core.embedded_redis import EmbeddedRedis
from core.settings import ApiKey, Settings
from tests.conftest import ServiceProcesses, png_bytes

KEY = "replicate-test-key"


def _as(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    settings.api.auth_required = True
    settings.api.keys = (
        ApiKey(name="alice", sha256=hash_key(KEY)),
        ApiKey(name="bob", sha256=hash_key("bob-key")),
    )
    with TestClient(create_app(settings)) as client:
        yield client


class _Listener:
    """A TCP port that records whether anything connected to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0

    def accepted(self) -> int:
        try:
            conn, _ = self.sock.accept()
            conn.close()
            self.connections += 1
        except TimeoutError:
            pass
        return self.connections


@pytest.mark.parametrize(
    "template",
    [
        "http://127.0.0.1:{port}/x",
        "http://[::ffff:127.0.0.1]:{port}/x",
        "http://localhost:{port}/x",
    ],
)
def test_internal_image_urls_are_refused_before_any_connection(
    api: TestClient, template: str
) -> None:
    listener = _Listener()
    url = template.format(port=listener.port)
    response = api.post(
        "/v1/models/spasemsr/lanczos/predictions",
        json={"input": {"image": url, "scale": 2}},
        headers=_as(),
    )
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["title"] == "Image URL not allowed"
    assert listener.accepted() == 0


def test_unknown_input_and_model_are_problems(api: TestClient) -> None:
    image = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    bad = api.post(
        "/v1/models/spasemsr/lanczos/predictions",
        json={"input": {"image": image, "stpes": 3}},
        headers=_as(),
    )
    assert bad.status_code == 422 and "stpes" in bad.json()["detail"]
    unknown = api.post(
        "/v1/models/spasemsr/nope/predictions", json={"input": {"image": image}}, headers=_as()
    )
    assert unknown.status_code == 404
    assert api.post("/v1/predictions", json={"input": {"image": image}}).status_code == 401


def test_files_are_owner_scoped(api: TestClient) -> None:
    created = api.post(
        "/v1/files", files={"content": ("a.png", png_bytes(), "image/png")}, headers=_as()
    )
    assert created.status_code == 201, created.text
    file = created.json()
    assert file["size"] == len(png_bytes()) and file["urls"]["get"].endswith("/download")
    assert api.get(f"/v1/files/{file['id']}", headers=_as()).json()["id"] == file["id"]
    assert api.get(file["urls"]["get"], headers=_as()).content == png_bytes()
    assert api.get(f"/v1/files/{file['id']}", headers=_as("bob-key")).status_code == 404


def test_model_schema_comes_from_the_job_form(api: TestClient) -> None:
    model = api.get("/v1/models/spasemsr/lanczos", headers=_as()).json()
    inputs = model["latest_version"]["openapi_schema"]["components"]["schemas"]["Input"]
    assert inputs["required"] == ["image"]
    assert inputs["properties"]["scale"]["enum"] == [2, 4]
    assert "webhook_url" not in inputs["properties"] and "model" not in inputs["properties"]


def _certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class _TlsService(ServiceProcesses):
    """The live service over HTTPS: Replicate's client reads only https: (and data:) output
    strings as files, as Replicate serves them."""

    def __init__(self, env: dict[str, str], log_dir: Path, cert: Path, key: Path) -> None:
        super().__init__(env, log_dir)
        self.cert, self.key = cert, key
        self.url = f"https://127.0.0.1:{self.port}"

    def start_api(self) -> None:
        self.api = self._spawn(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "app.main:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                "--ssl-certfile",
                str(self.cert),
                "--ssl-keyfile",
                str(self.key),
            ],
            "api.log",
        )
        self._wait_for("/healthz", timeout=30)


@pytest.fixture
def tls_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ServiceProcesses, ssl.SSLContext]]:
    cert, key = _certificate(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the readiness probes' httpx trusts it
    redis = EmbeddedRedis(Path(tmp_path / "r"), appendonly=False).start()
    service = _TlsService(
        {
            "SPASEMSR_REDIS__URL": redis.url,
            "SPASEMSR_VAR_DIR": str(tmp_path / "var"),
            "SPASEMSR_WORKER__HEARTBEAT_SECONDS": "1",
            # the trained Real-ESRGAN too: the client's first run is a real 4x upscale
            "SPASEMSR_WORKER__MODELS": '["lanczos", "realesrgan-x4plus"]',
            "SPASEMSR_MODEL__DEFAULT": "lanczos",
            "SPASEMSR_API__AUTH_REQUIRED": "true",
            "SPASEMSR_API__KEYS": f'[{{"name": "alice", "sha256": "{hash_key(KEY)}"}}]',
        },
        tmp_path,
        cert,
        key,
    )
    try:
        service.start_api()
        service.start_worker()
        yield service, ssl.create_default_context(cafile=str(cert))
    finally:
        service.stop()
        redis.stop()


def _astronaut(path: Path) -> Path:
    photo = np.asarray(skdata.astronaut())  # type: ignore[no-untyped-call]
    Image.fromarray(photo).resize((64, 64), Image.Resampling.LANCZOS).save(path)
    return path


def test_official_client_runs_a_model(
    tls_service: tuple[ServiceProcesses, ssl.SSLContext], tmp_path: Path
) -> None:
    service, trust = tls_service
    client = ReplicateClient(api_token=KEY, base_url=service.url, verify=trust)
    photo = _astronaut(tmp_path / "astronaut.png")
    with photo.open("rb") as handle:
        output = client.run("spasemsr/realesrgan-x4plus", input={"image": handle, "scale": 4})
    assert isinstance(output, FileOutput)
    result = Image.open(io.BytesIO(output.read()))
    assert result.size == (256, 256)

    uploaded = client.files.create(photo)
    prediction = client.predictions.create(
        version="spasemsr/lanczos", input={"image": uploaded.urls["get"], "scale": 4}
    )
    assert prediction.status in {"starting", "processing", "succeeded"}
    prediction.wait()
    assert prediction.status == "succeeded", prediction.error
    assert prediction.metrics is not None and prediction.metrics["predict_time"] >= 0
    assert client.predictions.get(prediction.id).output == prediction.output
    again = client.predictions.cancel(prediction.id)  # ended: returned as it is
    assert again.status == "succeeded"
    listed = client.predictions.list()
    assert {prediction.id} <= {p.id for p in listed.results} and len(listed.results) == 2
    model = client.models.get("spasemsr/lanczos")
    assert model.latest_version is not None
    assert (
        "image"
        in model.latest_version.openapi_schema["components"]["schemas"]["Input"]["properties"]
    )
