"""The browser page at ``/``: plain static files (no build step, nothing fetched from elsewhere).

The page's job form takes its bounds, defaults and choices from the form's own schema
(``app.schemas.JobCreate``, which takes them from the job contract), filled into
``index.html`` once per process: the page cannot offer what the API would refuse.
"""

from __future__ import annotations

import html
import string
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, Response

from app.schemas import JobCreate

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Only these files are served: no path from the request ever reaches the file system.
STATIC_FILES: dict[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

# The page talks to this origin only; blob: holds the local previews and results.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

web_router = APIRouter(include_in_schema=False)


@web_router.get("/")
def index() -> Response:
    return HTMLResponse(rendered_index(), headers=SECURITY_HEADERS)


# How the page names some choices; any other value is shown as it is.
CHOICE_LABELS: dict[str, dict[Any, str]] = {
    "scale": {2: "×2", 4: "×4"},
    "output_format": {"png": "PNG", "jpeg": "JPEG", "webp": "WebP"},
}
NUMBER_FIELDS = ("steps", "guidance_scale", "seed", "tile_size")
CHOICE_FIELDS = ("scale", "color_fix", "scheduler", "output_format", "priority")
TEXT_FIELDS = ("tags", "caption")


@lru_cache(maxsize=1)
def rendered_index() -> str:
    page = string.Template((STATIC_DIR / "index.html").read_text())
    return page.substitute(form_values(JobCreate.model_json_schema()))


def form_values(schema: dict[str, Any]) -> dict[str, str]:
    """The values ``index.html`` leaves open, from the form's JSON schema."""
    fields: dict[str, Any] = schema["properties"]
    values: dict[str, str] = {}
    for name in NUMBER_FIELDS:
        spec = _without_null(fields[name])
        values[f"{name}_min"] = _number(spec["minimum"])
        values[f"{name}_max"] = _number(spec["maximum"])
        values[f"{name}_default"] = _number(fields[name].get("default"))
        if "multipleOf" in spec:
            values[f"{name}_step"] = _number(spec["multipleOf"])
    for name in CHOICE_FIELDS:
        spec = _resolved(fields[name], schema)
        default = fields[name].get("default")
        values[f"{name}_options"] = "\n".join(
            _option(value, CHOICE_LABELS.get(name, {}).get(value, value), value == default)
            for value in spec["enum"]
        )
    for name in TEXT_FIELDS:
        values[f"{name}_maxlength"] = _number(_without_null(fields[name])["maxLength"])
    return values


def _without_null(spec: dict[str, Any]) -> dict[str, Any]:
    return next((s for s in spec.get("anyOf", []) if s.get("type") != "null"), spec)


def _resolved(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    reference = spec.get("$ref")
    if reference is None:
        return spec
    found: dict[str, Any] = schema["$defs"][reference.rsplit("/", 1)[1]]
    return found


def _number(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return html.escape(str(value))


def _option(value: object, label: object, selected: bool) -> str:
    chosen = " selected" if selected else ""
    text = html.escape(str(value), quote=True)
    return f'              <option value="{text}"{chosen}>{html.escape(str(label))}</option>'


@web_router.get("/static/{name}")
def static_file(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise HTTPException(status_code=404, detail=f"No static file {name!r}.")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=SECURITY_HEADERS)
