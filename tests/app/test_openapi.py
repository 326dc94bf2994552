"""The OpenAPI document and the docs pages: named schemas, problem+json for every error, the
API-key schemes, and Swagger UI / ReDoc served from this service (nothing from a CDN)."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from app.main import create_app
from core.settings import Settings


def _client() -> TestClient:
    return TestClient(create_app(Settings()))


def test_the_document_names_its_schemas_and_describes_every_error() -> None:
    document = _client().get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    assert "JobUpload" in schemas and not any(name.startswith("Body_") for name in schemas)
    upload = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert upload["multipart/form-data"]["schema"]["$ref"] == "#/components/schemas/JobUpload"
    assert set(document["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for code, response in operation["responses"].items():
                if code.startswith(("4", "5")):
                    content = response["content"]["application/problem+json"]
                    assert content["schema"]["$ref"] == "#/components/schemas/Problem", (
                        method, path, code,
                    )  # fmt: skip
    assert "example" in schemas["Problem"]


def test_the_docs_pages_load_nothing_from_elsewhere() -> None:
    client = _client()
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        sources = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
        assert sources, page
        assert not [s for s in sources if re.match(r"(https?:)?//", s)], (page, sources)
        for source in re.findall(r'(?:src|href)="(/[^"]+)"', html):
            assert client.get(source).status_code == 200, source
