"""Webhooks: address checks (SSRF), signatures, and delivery with retries to a real receiver."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from core.embedded_redis import EmbeddedRedis
from core.webhooks import SIGNATURE_HEADER, WebhookRefused, check_url, deliver, sign, verify
from tests.conftest import png_bytes, start_service, wait_for_status


def _resolving_to(*addresses: str):  # type: ignore[no-untyped-def]
    return lambda host, port: list(addresses)


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.5", "192.168.1.1", "169.254.169.254", "::1",
     "fd00::1", "::ffff:127.0.0.1", "0.0.0.0", "224.0.0.1", "100.64.0.1"],
)  # fmt: skip
def test_internal_addresses_are_refused(address: str) -> None:
    with pytest.raises(WebhookRefused):
        check_url("https://hooks.example.com/x", resolver=_resolving_to(address))


def test_public_addresses_pass_and_allowlists_open_private_ones() -> None:
    parts, address = check_url("https://hooks.example.com/x", resolver=_resolving_to("8.8.8.8"))
    assert (parts.hostname, address) == ("hooks.example.com", "8.8.8.8")
    check_url("http://10.0.0.7:8080/h", allow_networks=["10.0.0.0/8"],
              resolver=_resolving_to("10.0.0.7"))  # fmt: skip
    with pytest.raises(WebhookRefused):  # one bad address among several is enough to refuse
        check_url("https://h.example.com", resolver=_resolving_to("8.8.8.8", "127.0.0.1"))


@pytest.mark.parametrize(
    "url", ["ftp://example.com/x", "file:///etc/passwd", "https://user:pw@example.com/", "/rel",
            "https://" + "a" * 2100 + ".com"],
)  # fmt: skip
def test_malformed_urls_are_refused(url: str) -> None:
    with pytest.raises(WebhookRefused):
        check_url(url, resolver=_resolving_to("8.8.8.8"))


def test_a_dns_answer_that_changes_after_submission_is_caught_at_delivery() -> None:
    answers = iter([["8.8.8.8"], ["127.0.0.1"]])
    resolver = lambda host, port: next(answers)  # noqa: E731
    check_url("https://rebind.example.com/", resolver=resolver)  # at submission: public
    with pytest.raises(WebhookRefused):
        deliver("https://rebind.example.com/", {}, secret="s", resolver=resolver)


def test_signature_roundtrip() -> None:
    body = b'{"id":"1"}'
    header = sign("secret", body, 1_700_000_000)
    assert header.startswith("t=1700000000,v1=")
    assert not verify("secret", body, header)  # stale timestamp
    import time

    fresh = sign("secret", body, int(time.time()))
    assert verify("secret", body, fresh)
    assert not verify("other", body, fresh)
    assert not verify("secret", body + b" ", fresh)


class _Receiver:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.done = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append((dict(self.headers), body))
                failing = len(receiver.calls) <= receiver.failures
                self.send_response(500 if failing else 204)
                self.end_headers()
                if not failing:
                    receiver.done.set()

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    server = _Receiver(failures=1)
    yield server
    server.server.shutdown()


def test_completion_webhook_is_signed_and_retried(
    redis_server: EmbeddedRedis, tmp_path: Path, receiver: _Receiver
) -> None:
    service = start_service(
        redis_server.url, tmp_path,
        SPASEMSR_WORKER__MODELS='["lanczos"]', SPASEMSR_MODEL__DEFAULT="lanczos",
        SPASEMSR_WEBHOOKS__SECRET="hook-secret",
        SPASEMSR_WEBHOOKS__ALLOW_NETWORKS='["127.0.0.0/8"]',
        SPASEMSR_WEBHOOKS__RETRY_INTERVALS_SECONDS="[1, 1]",
    )  # fmt: skip
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            refused = client.post(
                "/v1/jobs", files={"image": ("a.png", png_bytes())},
                data={"webhook_url": "http://169.254.169.254/latest/meta-data"},
            )  # fmt: skip
            assert refused.status_code == 422
            assert refused.json()["title"] == "Webhook URL not allowed"
            created = client.post(
                "/v1/jobs", files={"image": ("a.png", png_bytes())},
                data={"webhook_url": receiver.url, "scale": "2"},
            )  # fmt: skip
            assert created.status_code == 202, created.text
            job = wait_for_status(client, created.json()["id"], {"succeeded"})
            assert receiver.done.wait(30), service.logs()
        assert len(receiver.calls) == 2  # one failure (500), then delivered after the backoff
        headers, body = receiver.calls[-1]
        assert verify("hook-secret", body, headers[SIGNATURE_HEADER])
        payload = json.loads(body)
        assert payload["id"] == job["id"] and payload["status"] == "succeeded"
        assert payload["output"]["width"] == 48
        assert (payload["model"], payload["model_trained"]) == ("lanczos", True)
    finally:
        service.stop()


def test_webhooks_are_refused_when_not_configured(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from core.settings import Settings

    settings = Settings(var_dir=tmp_path, redis={"url": redis_server.url})
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/v1/jobs", files={"image": ("a.png", png_bytes())},
            data={"webhook_url": "https://example.com/hook"},
        )  # fmt: skip
        assert response.status_code == 422
        assert "not enabled" in response.json()["detail"]
