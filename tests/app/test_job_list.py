"""GET /v1/jobs: the caller's own jobs, newest first, a page at a time (cursor links)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.app.test_api_errors import _assert_problem
from tests.app.test_security import ALICE, BOB, _as
from tests.app.test_security import secured as secured  # the fixture
from tests.conftest import png_bytes


def _submit(client: TestClient, key: str) -> str:
    files = {"image": ("a.png", png_bytes(), "image/png")}
    response = client.post("/v1/jobs", files=files, headers=_as(key))
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_each_caller_lists_its_own_jobs_newest_first_by_pages(secured: TestClient) -> None:
    alices = [_submit(secured, ALICE) for _ in range(5)]
    bobs = [_submit(secured, BOB) for _ in range(2)]
    seen: list[str] = []
    url: str | None = "/v1/jobs?limit=2"
    pages = 0
    while url is not None:
        page = secured.get(url, headers=_as(ALICE))
        assert page.status_code == 200, page.text
        body = page.json()
        seen += [job["id"] for job in body["jobs"]]
        url = body["next"]
        pages += 1
    assert seen == list(reversed(alices))  # none of Bob's, newest first, each once
    assert pages == 3
    listed_for_bob = secured.get("/v1/jobs", headers=_as(BOB)).json()["jobs"]
    assert [job["id"] for job in listed_for_bob] == list(reversed(bobs))


def test_a_cursor_not_given_by_the_service_is_a_422(secured: TestClient) -> None:
    refused = secured.get("/v1/jobs?cursor=nope", headers=_as(ALICE))
    _assert_problem(refused, 422, "Invalid parameters")
    _assert_problem(secured.get("/v1/jobs"), 401, "Missing or invalid API key")
