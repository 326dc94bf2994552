"""The page's files as served (no browser): headers, no external references, form bounds."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.schemas import JobCreate
from app.web import STATIC_DIR, rendered_index
from core.jobs import ImageFormat, JobParameters, Priority
from core.settings import Settings

# Fields a person fills in on the page; the webhook is for service-to-service callers.
NOT_ON_THE_PAGE = {"webhook_url"}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


class _Controls(HTMLParser):
    """Form controls by id: their attributes, and the option values of selects."""

    def __init__(self) -> None:
        super().__init__()
        self.controls: dict[str, dict[str, Any]] = {}
        self._select: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag in {"input", "select", "textarea"} and attributes.get("id"):
            control_id = str(attributes["id"])
            self.controls[control_id] = {"tag": tag, **attributes, "options": []}
            self._select = control_id if tag == "select" else None
        elif tag == "option" and self._select is not None:
            self.controls[self._select]["options"].append(attributes.get("value"))

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = None


def _controls() -> dict[str, dict[str, Any]]:
    parser = _Controls()
    parser.feed(rendered_index())  # the page as served: its form filled in from the schema
    return parser.controls


def _labels() -> set[str]:
    return set(re.findall(r'<label for="([^"]+)"', rendered_index()))


def test_page_and_assets_are_served_with_a_strict_policy(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "connect-src 'self'" in policy
    assert "script-src 'self'" in policy
    for name, media_type in (("app.js", "text/javascript"), ("style.css", "text/css")):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200
        assert asset.headers["content-type"].startswith(media_type)
        assert asset.text == (STATIC_DIR / name).read_text()
    assert "/static/app.js" in page.text
    assert "/static/style.css" in page.text


def test_nothing_outside_the_allow_list_is_served(client: TestClient) -> None:
    for path in ("/static/index.html", "/static/..%2Fweb.py", "/static/nope.js"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/problem+json"
    assert "/" not in client.get("/openapi.json").json()["paths"]


def test_no_file_refers_to_another_origin() -> None:
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC_DIR / name).read_text()
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import", text), name


def test_form_controls_match_the_api_bounds() -> None:
    controls = _controls()
    labelled = _labels()
    schema = JobParameters.model_json_schema()["properties"]
    for field in set(JobCreate.model_fields) - NOT_ON_THE_PAGE:
        assert field in controls, f"the page has no control for {field}"
        assert field in labelled, f"{field} has no <label for>"

    def bounds(name: str) -> dict[str, Any]:
        entry = schema[name]
        return next((e for e in entry.get("anyOf", []) if e.get("type") != "null"), entry)

    for name in ("steps", "guidance_scale", "seed", "tile_size"):
        expected = bounds(name)
        assert float(controls[name]["min"]) == expected["minimum"], name
        assert float(controls[name]["max"]) == expected["maximum"], name
    assert int(controls["tile_size"]["step"]) == schema["tile_size"]["multipleOf"]
    assert int(controls["caption"]["maxlength"]) == bounds("caption")["maxLength"]
    tags = JobCreate.model_json_schema()["properties"]["tags"]["anyOf"][0]
    assert int(controls["tags"]["maxlength"]) == tags["maxLength"]
    assert sorted(map(int, controls["scale"]["options"])) == schema["scale"]["enum"]
    assert sorted(controls["color_fix"]["options"]) == sorted(schema["color_fix"]["enum"])
    assert sorted(controls["scheduler"]["options"]) == sorted(schema["scheduler"]["enum"])
    assert sorted(controls["output_format"]["options"]) == sorted(f.value for f in ImageFormat)
    assert sorted(controls["priority"]["options"]) == sorted(p.value for p in Priority)
    # Every other control on the page is labelled too (accessibility).
    unlabelled = {c for c in controls if c not in labelled and c != "files"}
    assert unlabelled == set()
    assert "files" in labelled


def test_model_picker_and_bicubic_before_are_on_the_page() -> None:
    controls = _controls()
    assert controls["model"]["tag"] == "select"  # filled from GET /v1/models by app.js
    assert "model" in _labels()
    script = (STATIC_DIR / "app.js").read_text()
    assert '"/v1/models"' in script
    assert 'imageSmoothingQuality = "high"' in script
    html = (STATIC_DIR / "index.html").read_text()
    assert "Before (bicubic)" in html and "bicubic</strong> interpolation" in html
    css = (STATIC_DIR / "style.css").read_text()
    # Only past 100% zoom are pixels shown as blocks; the "before" itself is never pixelated.
    assert not re.search(r"\.before\s*\{[^}]*pixelated", css)
    assert re.search(r"\.compare\.pixelated img\s*\{[^}]*pixelated", css)


def test_the_form_is_filled_in_from_the_schema_not_written_in_the_page() -> None:
    from app.web import form_values

    schema = JobCreate.model_json_schema()
    schema["properties"]["steps"] = {**schema["properties"]["steps"], "maximum": 50, "default": 8}
    schema["properties"]["scheduler"] = {**schema["properties"]["scheduler"], "enum": ["ddim"]}
    values = form_values(schema)
    assert (values["steps_max"], values["steps_default"]) == ("50", "8")
    assert values["scheduler_options"].count("<option") == 1
    template = (STATIC_DIR / "index.html").read_text()
    assert 'max="$steps_max"' in template and "dpmsolver++" not in template
