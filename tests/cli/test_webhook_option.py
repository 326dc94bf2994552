"""`spasemsr submit --webhook` and the client's ``webhook`` option reach the API as its
``webhook_url`` field (they used to be refused as an unknown field), and the API's SSRF check
then applies to them."""

from __future__ import annotations

from pathlib import Path

import pytest

from client import SpaSemSRClient
from client.errors import ProblemError
from tests.cli.test_cli import spasemsr
from tests.conftest import ServiceProcesses, png_bytes


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
