"""A live service and headless Debian Chromium driven by Playwright (never a downloaded browser)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import sync_playwright

from tests.client.live import live_service, shared_service
from tests.conftest import ROOT, ServiceProcesses

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "var" / "test-artifacts" / "web"
# Nothing but the page under test: no sync, no component updates, no first-run traffic.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def web_service(request: pytest.FixtureRequest) -> ServiceProcesses:
    """API + one Lanczos worker (shared with the client and CLI tests)."""
    return shared_service(request, "lanczos")


@pytest.fixture(scope="module")
def workerless_service() -> Iterator[ServiceProcesses]:
    """An API with no worker yet; the last test of the module starts one."""
    with live_service(workers=0) as service:
        yield service


@pytest.fixture(scope="module")
def browser_context() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (Debian package `chromium`)")
    profile = Path(tempfile.mkdtemp(prefix="ssr-chromium-"))
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                str(profile),
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_ARGS,
                accept_downloads=True,
                viewport={"width": 1280, "height": 900},
            )
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser_context: Any) -> Iterator[Any]:
    page = browser_context.new_page()
    page.set_default_timeout(20_000)
    try:
        yield page
    finally:
        page.close()


@pytest.fixture
def requested(page: Any) -> list[str]:
    """Every URL the page asks for from now on (to prove nothing leaves the origin)."""
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    return urls


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
