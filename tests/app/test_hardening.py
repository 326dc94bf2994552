"""Hardening of the HTTP edge, against a real Redis and (where sockets matter) real servers:
405s that name every method of a path, throttled API-key guessing, a hard queue-depth cap
under concurrent uploads to several API processes, and deadlines for slow clients (request
body, request head)."""

from __future__ import annotations

import select
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from redis import Redis

from app.main import create_app
from app.security import hash_key
from core.embedded_redis import EmbeddedRedis
from core.settings import ApiKey, Settings
from tests.app.test_api_errors import _assert_problem
from tests.conftest import ServiceProcesses, png_bytes, start_service

GOOD_KEY = "alice-secret-key"


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


# --- 405 names every method of the path ------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("OPTIONS", "/v1/jobs/some-id", {"GET", "DELETE"}),
        ("PUT", "/v1/jobs/some-id", {"GET", "DELETE"}),
        ("PATCH", "/v1/jobs", {"GET", "POST"}),
        ("GET", "/v1/jobs/some-id/cancel", {"POST"}),
        ("OPTIONS", "/metrics", {"GET", "HEAD"}),
    ],
)
def test_405_allow_names_every_method_of_the_path(
    client: TestClient, method: str, path: str, allowed: set[str]
) -> None:
    response = client.request(method, path)
    _assert_problem(response, 405, "Method Not Allowed")
    assert {m.strip() for m in response.headers["allow"].split(",")} == allowed


def test_a_method_the_path_supports_is_not_405(client: TestClient) -> None:
    assert client.delete("/v1/jobs/some-id").status_code == 404  # DELETE is served there


# --- failed API keys are throttled per address -----------------------------------------------


def _secured(settings: Settings, failures_per_minute: int) -> Settings:
    settings.api.auth_required = True
    settings.api.keys = (ApiKey(name="alice", sha256=hash_key(GOOD_KEY)),)
    settings.api.auth_failures_per_minute = failures_per_minute
    return settings


def _with_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_failed_keys_are_throttled_per_address_across_api_processes(settings: Settings) -> None:
    _secured(settings, failures_per_minute=3)
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as other:
        for attempt in range(3):
            _assert_problem(
                one.get("/v1/models", headers=_with_key(f"guess-{attempt}")),
                401,
                "Missing or invalid API key",
            )
        # Counted in Redis: another API process refuses the address too, before any key check.
        for client, key in ((other, "guess-3"), (one, GOOD_KEY), (other, GOOD_KEY)):
            refused = client.get("/v1/models", headers=_with_key(key))
            _assert_problem(refused, 429, "Rate limit exceeded")
            assert 1 <= int(refused.headers["retry-after"]) <= 60
        # A request with no key has nothing to guess with: it is answered as before.
        _assert_problem(one.get("/v1/models"), 401, "Missing or invalid API key")

        # When the window is over (its counter expires), keys are checked again.
        connection = Redis.from_url(settings.redis.url or "")
        counters = list(connection.scan_iter("spasemsr:auth-failures:*"))
        assert len(counters) == 1
        connection.pexpire(counters[0], 1)
        deadline = time.monotonic() + 5
        while connection.exists(counters[0]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert one.get("/v1/models", headers=_with_key(GOOD_KEY)).status_code == 200


def test_successful_keys_do_not_count_as_failures(settings: Settings) -> None:
    _secured(settings, failures_per_minute=2)
    with TestClient(create_app(settings)) as client:
        for _ in range(10):
            assert client.get("/v1/models", headers=_with_key(GOOD_KEY)).status_code == 200
        assert client.get("/v1/models", headers=_with_key("guess-0")).status_code == 401
        assert client.get("/v1/models", headers=_with_key(GOOD_KEY)).status_code == 200
        assert client.get("/v1/models", headers=_with_key("guess-1")).status_code == 401
        assert client.get("/v1/models", headers=_with_key(GOOD_KEY)).status_code == 429


def test_zero_turns_the_key_throttle_off(settings: Settings) -> None:
    _secured(settings, failures_per_minute=0)
    with TestClient(create_app(settings)) as client:
        for attempt in range(15):
            assert client.get("/v1/models", headers=_with_key(f"g{attempt}")).status_code == 401
        assert client.get("/v1/models", headers=_with_key(GOOD_KEY)).status_code == 200


# --- the queue-depth cap is hard -------------------------------------------------------------


def _service_dir(tmp_path: Path, name: str) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    return directory


def test_queue_depth_cap_holds_for_concurrent_uploads_to_two_api_processes(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """40 uploads at once, split over two API processes, cap 20, no worker draining the queue:
    exactly 20 are accepted."""
    env = {"SPASEMSR_API__MAX_QUEUE_DEPTH": "20", "SPASEMSR_MODEL__DEFAULT": "lanczos"}
    services = [
        start_service(redis_server.url, _service_dir(tmp_path, name), workers=0, **env)
        for name in ("api-a", "api-b")
    ]
    image = png_bytes()
    start = threading.Barrier(40)

    def submit(index: int) -> httpx.Response:
        with httpx.Client(base_url=services[index % 2].url, timeout=60) as http:
            http.get("/healthz")  # connected before the race starts
            start.wait(timeout=30)
            return http.post("/v1/jobs", files={"image": ("a.png", image, "image/png")})

    try:
        with ThreadPoolExecutor(max_workers=40) as pool:
            responses = list(pool.map(submit, range(40)))
    finally:
        for service in services:
            service.stop()

    assert Counter(r.status_code for r in responses) == {202: 20, 429: 20}, [
        r.text for r in responses if r.status_code not in (202, 429)
    ]
    for refused in (r for r in responses if r.status_code == 429):
        _assert_problem(refused, 429, "Service overloaded")
        assert int(refused.headers["retry-after"]) >= 1
    connection = Redis.from_url(redis_server.url)
    queued = sum(
        connection.llen(f"rq:queue:spasemsr-lanczos-{p}") for p in ("high", "default", "low")
    )
    assert queued == 20
    assert connection.zcard("spasemsr:admission:lanczos") == 0  # every place became an entry


def test_a_refused_or_replayed_upload_gives_its_place_back(settings: Settings) -> None:
    settings.api.max_queue_depth = 2
    with TestClient(create_app(settings)) as client:
        upload = {"image": ("a.png", png_bytes(), "image/png")}
        first = client.post("/v1/jobs", files=upload, headers={"Idempotency-Key": "k"})
        assert first.status_code == 202
        for _ in range(3):  # replays take a place for a moment, then give it back
            again = client.post("/v1/jobs", files=upload, headers={"Idempotency-Key": "k"})
            assert again.headers.get("idempotent-replayed") == "true"
        assert client.post("/v1/jobs", files=upload).status_code == 202
        assert client.post("/v1/jobs", files=upload).status_code == 429
        connection = Redis.from_url(settings.redis.url or "")
        assert connection.zcard("spasemsr:admission:lanczos") == 0


# --- slow clients ------------------------------------------------------------------------------


def _dribble(conn: socket.socket, pieces: Iterator[bytes], *, every: float, bound: float) -> bytes:
    """Send one piece every ``every`` seconds until the server answers or closes (or ``bound``
    seconds pass); then read what it sends until it closes. Returns the bytes received."""
    answer = b""
    began = time.monotonic()
    while time.monotonic() - began < bound:
        if select.select([conn], [], [], every)[0]:
            break
        piece = next(pieces, None)
        if piece is None:
            continue
        try:
            conn.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            break
    conn.settimeout(max(1.0, bound - (time.monotonic() - began)))
    try:
        while chunk := conn.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    return answer


def _forever(piece: bytes) -> Iterator[bytes]:
    while True:
        yield piece


def test_a_body_that_trickles_in_past_the_deadline_gets_408(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """One byte every 0.2 s never trips the idle timeout (30 s); the body deadline cuts it."""
    service = start_service(
        redis_server.url, tmp_path, workers=0, SPASEMSR_API__BODY_DEADLINE_SECONDS="1.5"
    )
    try:
        head = (
            b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="a"\r\n\r\n\x89PNG'
        )
        with socket.create_connection(("127.0.0.1", service.port), timeout=30) as conn:
            conn.sendall(head)
            answer = _dribble(conn, _forever(b"\x00"), every=0.2, bound=15)
        text = answer.decode(errors="replace")
        assert text.startswith("HTTP/1.1 408"), text
        assert "Upload too slow" in text
        assert "not complete 1.5 s after its headers" in text
        assert httpx.get(service.url + "/healthz", timeout=5).status_code == 200
    finally:
        service.stop()


def _start_server_module(redis_url: str, tmp_path: Path, **env: str) -> ServiceProcesses:
    """``python -m app.server`` (``run_api``) as its own process, configured from the env."""
    service = ServiceProcesses(
        {"SPASEMSR_REDIS__URL": redis_url, "SPASEMSR_VAR_DIR": str(tmp_path / "var"), **env},
        tmp_path,
    )
    service.env["SPASEMSR_API__HOST"] = "127.0.0.1"
    service.env["SPASEMSR_API__PORT"] = str(service.port)
    try:
        service.api = service._spawn([sys.executable, "-m", "app.server"], "api.log")
        service._wait_for("/healthz", timeout=30)
    except BaseException:
        service.stop()
        raise
    return service


@pytest.fixture
def head_deadline_server(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[ServiceProcesses]:
    service = _start_server_module(
        redis_server.url,
        tmp_path,
        SPASEMSR_API__HEADER_DEADLINE_SECONDS="1",
        SPASEMSR_MODEL__DEFAULT="lanczos",
    )
    try:
        yield service
    finally:
        service.stop()


def test_a_request_head_sent_line_by_line_is_cut_off(
    head_deadline_server: ServiceProcesses,
) -> None:
    """A header line every 0.25 s would hold the connection forever without a head deadline."""
    with socket.create_connection(("127.0.0.1", head_deadline_server.port), timeout=30) as conn:
        began = time.monotonic()
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        answer = _dribble(conn, _forever(b"X-Slow: 1\r\n"), every=0.25, bound=10)
        elapsed = time.monotonic() - began
    assert answer == b""  # closed without an answer: the head never completed
    assert 0.5 < elapsed < 10, elapsed


def test_a_silent_connection_is_cut_off(head_deadline_server: ServiceProcesses) -> None:
    with socket.create_connection(("127.0.0.1", head_deadline_server.port), timeout=30) as conn:
        began = time.monotonic()
        answer = _dribble(conn, iter(()), every=0.25, bound=10)
        assert answer == b""
        assert time.monotonic() - began < 10


def test_complete_heads_are_not_cut_by_the_head_deadline(
    head_deadline_server: ServiceProcesses,
) -> None:
    """Normal requests work, and a body slower than the head deadline still gets its answer:
    the timer stops once the head is complete."""
    assert httpx.get(head_deadline_server.url + "/healthz", timeout=5).status_code == 200
    body = (
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + png_bytes() + b"\r\n--b--\r\n"
    )
    head = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    size = len(body) // 10 + 1
    pieces = iter([body[i : i + size] for i in range(0, len(body), size)])
    with socket.create_connection(("127.0.0.1", head_deadline_server.port), timeout=30) as conn:
        conn.sendall(head)
        answer = _dribble(conn, pieces, every=0.25, bound=20)  # about 2.5 s of body
    text = answer.decode(errors="replace")
    assert text.startswith("HTTP/1.1 202"), text
