"""`spasemsr submit --webhook` and the client's ``webhook`` option reach the API as its
``webhook_url`` field (they used to be refused as an unknown field), and the API's SSRF check
then applies to them."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from spasemsr_client import JobStatus, SpaSemSRClient
from spasemsr_client.errors import ProblemError

from tests.cli.test_cli import spasemsr
from tests.client.live import live_service
from tests.conftest import ServiceProcesses, png_bytes

DELIVERY_SECONDS = 60.0


class Receiver:
    """A loopback HTTP server that keeps the JSON body of every webhook POSTed to it."""

    def __init__(self) -> None:
        self.bodies: queue.Queue[dict[str, Any]] = queue.Queue()
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                bodies.put(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered_for(self, job_id: str) -> dict[str, Any]:
        """The webhook of ``job_id`` (others, e.g. of an earlier test, are skipped)."""
        while True:
            body = self.bodies.get(timeout=DELIVERY_SECONDS)
            if body.get("id") == job_id:
                return body


@pytest.fixture(scope="module")
def hooked_service() -> Iterator[ServiceProcesses]:
    """API + a Lanczos worker with webhooks on, loopback receivers allowed (as in a VPC)."""
    with live_service(
        SPASEMSR_WEBHOOKS__SECRET="hook-secret",
        SPASEMSR_WEBHOOKS__ALLOW_NETWORKS='["127.0.0.0/8"]',
    ) as service:
        yield service


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.server.shutdown()


def test_the_cli_sends_the_webhook_as_the_apis_field(
    idle_service: ServiceProcesses, tmp_path: Path
) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes())
    refused = spasemsr(
        "submit", str(tmp_path / "a.png"), "--url", idle_service.url, "--no-wait",
        "--retries", "0", "--webhook", "http://127.0.0.1:9/hook",
    )  # fmt: skip
    assert refused.returncode == 4, refused.stderr
    assert "Unknown form field" not in refused.stderr
    assert "webhook" in refused.stderr.lower()


def test_the_clients_webhook_option_is_the_apis_field(idle_service: ServiceProcesses) -> None:
    with SpaSemSRClient(idle_service.url) as client, pytest.raises(ProblemError) as refused:
        client.submit(png_bytes(), filename="a.png", webhook="http://10.0.0.1/hook")
    assert "Unknown form field" not in str(refused.value)
    assert refused.value.status_code == 422


def test_the_clients_webhook_is_called_when_the_job_ends(
    hooked_service: ServiceProcesses, receiver: Receiver
) -> None:
    with SpaSemSRClient(hooked_service.url) as client:
        job = client.submit(png_bytes(), filename="a.png", scale=2, webhook=receiver.url)
        finished = client.wait(job.id, timeout=DELIVERY_SECONDS)
    assert finished.status is JobStatus.SUCCEEDED
    delivered = receiver.delivered_for(job.id)
    assert delivered["status"] == "succeeded"


def test_the_clis_webhook_is_called_when_the_job_ends(
    hooked_service: ServiceProcesses, receiver: Receiver, tmp_path: Path
) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes())
    done = spasemsr(
        "submit", str(tmp_path / "a.png"), "--url", hooked_service.url, "--scale", "2",
        "--webhook", receiver.url, "--json", "--lines",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    job_id = json.loads(done.stdout.splitlines()[-1])["job"]["id"]
    assert receiver.delivered_for(job_id)["status"] == "succeeded"
