"""A prediction's webhooks as Replicate sends them: the events of ``webhook_events_filter``
(all of them without one), each one the signed prediction object, to a real receiver."""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.embedded_redis import EmbeddedRedis
from core.webhooks import SIGNATURE_HEADER, verify
from tests.conftest import ServiceProcesses, png_bytes, start_service

SECRET = "prediction-hook-secret"
IMAGE = "data:image/png;base64," + base64.b64encode(png_bytes(24, 16)).decode()
TERMINAL = {"succeeded", "failed", "canceled"}


class Receiver:
    """Records every delivery per path, in arrival order; answers 204."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[dict[str, str], bytes]]] = {}
        self.ended: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.record(self.path, dict(self.headers), body)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def record(self, path: str, headers: dict[str, str], body: bytes) -> None:
        with self._lock:
            self.calls.setdefault(path, []).append((headers, body))
            if json.loads(body).get("status") in TERMINAL:
                self.ended.setdefault(path, threading.Event()).set()

    def wait_for_end(self, path: str, timeout: float = 60) -> list[dict[str, Any]]:
        with self._lock:
            ended = self.ended.setdefault(path, threading.Event())
        assert ended.wait(timeout), f"no completed webhook on {path}: {self.calls.get(path)}"
        payloads = []
        for headers, body in self.calls[path]:
            assert verify(SECRET, body, headers[SIGNATURE_HEADER]), headers
            payloads.append(json.loads(body))
        return payloads


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.server.shutdown()


@pytest.fixture(scope="module")
def service(
    redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcesses]:
    running = start_service(
        redis_server.url, tmp_path_factory.mktemp("service"),
        SPASEMSR_WORKER__MODELS='["lanczos"]', SPASEMSR_MODEL__DEFAULT="lanczos",
        SPASEMSR_WEBHOOKS__SECRET=SECRET,
        SPASEMSR_WEBHOOKS__ALLOW_NETWORKS='["127.0.0.0/8"]',
    )  # fmt: skip
    yield running
    running.stop()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[EmbeddedRedis]:
    """One redis-server for the module's service (the shared fixture is per test); a short
    directory, as unix socket paths have a length limit."""
    directory = Path(tempfile.mkdtemp(prefix="ssr-redis-"))
    server = EmbeddedRedis(directory, appendonly=False).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _predict(service: ServiceProcesses, hook: str, **webhook: object) -> dict[str, Any]:
    with httpx.Client(base_url=service.url, timeout=30) as client:
        created = client.post(
            "/v1/models/spasemsr/lanczos/predictions",
            json={"input": {"image": IMAGE, "scale": 2}, "webhook": hook, **webhook},
        )
    assert created.status_code == 201, created.text
    prediction: dict[str, Any] = created.json()
    return prediction


def _assert_the_prediction(payload: dict[str, Any], created: dict[str, Any]) -> None:
    assert payload["id"] == created["id"] and payload["model"] == "spasemsr/lanczos"
    assert payload["urls"] == created["urls"]  # absolute, as the API answered them
    assert payload["urls"]["get"].startswith("http://127.0.0.1:")


def test_start_and_completed_only(service: ServiceProcesses, receiver: Receiver) -> None:
    created = _predict(
        service, f"{receiver.url}/start-completed", webhook_events_filter=["start", "completed"]
    )
    payloads = receiver.wait_for_end("/start-completed")
    assert [p["status"] for p in payloads] == ["processing", "succeeded"], payloads
    start, completed = payloads
    assert start["started_at"] and start["completed_at"] is None and start["output"] is None
    assert completed["output"] == f"{service.url}/v1/jobs/{created['id']}/result"
    for payload in payloads:
        _assert_the_prediction(payload, created)


def test_without_a_filter_every_event_is_sent_in_order(
    service: ServiceProcesses, receiver: Receiver
) -> None:
    created = _predict(service, f"{receiver.url}/all")
    payloads = receiver.wait_for_end("/all")
    statuses = [p["status"] for p in payloads]
    assert statuses[-1] == "succeeded" and set(statuses[:-1]) == {"processing"}, statuses
    assert len(payloads) >= 3, payloads  # start, at least one output/logs, completed
    assert payloads[0]["logs"] == "starting"  # the start: no step yet
    progress = [p["logs"] for p in payloads[1:-1]]
    assert all("|" in logs for logs in progress), progress  # a progress bar each
    assert payloads[-1]["metrics"]["predict_time"] >= 0
    for payload in payloads:
        _assert_the_prediction(payload, created)
    # The prediction object is the one the API shows.
    with httpx.Client(base_url=service.url, timeout=30) as client:
        shown = client.get(f"/v1/predictions/{created['id']}").json()
    assert payloads[-1] == shown


def test_completed_only(service: ServiceProcesses, receiver: Receiver) -> None:
    created = _predict(service, f"{receiver.url}/completed", webhook_events_filter=["completed"])
    payloads = receiver.wait_for_end("/completed")
    assert [p["status"] for p in payloads] == ["succeeded"]
    _assert_the_prediction(payloads[0], created)


def test_an_unknown_event_is_refused(service: ServiceProcesses, receiver: Receiver) -> None:
    with httpx.Client(base_url=service.url, timeout=30) as client:
        refused = client.post(
            "/v1/models/spasemsr/lanczos/predictions",
            json={"input": {"image": IMAGE}, "webhook": f"{receiver.url}/x",
                  "webhook_events_filter": ["finished"]},
        )  # fmt: skip
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
