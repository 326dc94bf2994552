"""/docs renders its operations in headless Chromium with every request to another origin
refused, as on a machine without internet (a screenshot goes to the test artifacts)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from tests.conftest import ServiceProcesses
from tests.web.conftest import ARTIFACTS


def test_docs_render_offline(page: Any, web_service: ServiceProcesses) -> None:
    origin = urlsplit(web_service.url).netloc
    refused: list[str] = []

    def same_origin_only(route: Any) -> None:
        if urlsplit(route.request.url).netloc == origin:
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    page.route("**/*", same_origin_only)
    page.goto(web_service.url + "/docs")
    page.wait_for_selector(".opblock", timeout=30_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert "/v1/jobs" in [p.replace("\u200b", "") for p in paths], paths
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "docs-offline.png"), full_page=False)
    page.goto(web_service.url + "/redoc")
    page.wait_for_selector("[data-section-id]", timeout=30_000)
    assert refused == [], refused
