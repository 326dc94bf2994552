"""Live services for the client, CLI and web tests: own redis-server, API and Lanczos workers.

``shared_service`` starts a service the first time a session asks for it by name and keeps it
for the rest of the session, so the three test packages pay its start-up once.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from core.embedded_redis import EmbeddedRedis
from tests.conftest import ServiceProcesses, start_service

IDLE_ENV = {
    # No worker, room for one queued job and a short Retry-After: 429 on demand.
    "SPASEMSR_API__MAX_QUEUE_DEPTH": "1",
    "SPASEMSR_API__RETRY_AFTER_SECONDS": "1",
}

_RUNNING: dict[str, ServiceProcesses] = {}


@contextmanager
def live_service(*, workers: int = 1, **env: str) -> Iterator[ServiceProcesses]:
    """Real processes as in production; a short temporary folder keeps the socket path short."""
    directory = Path(tempfile.mkdtemp(prefix="ssr-live-"))
    redis = EmbeddedRedis(directory / "redis", appendonly=False).start()
    try:
        service = start_service(
            redis.url,
            directory,
            workers=workers,
            SPASEMSR_WORKER__MODELS='["lanczos"]',
            SPASEMSR_MODEL__DEFAULT="lanczos",
            **env,
        )
        try:
            yield service
        finally:
            service.stop()
    finally:
        redis.stop()
        shutil.rmtree(directory, ignore_errors=True)


def shared_service(
    request: pytest.FixtureRequest, name: str, *, workers: int = 1, **env: str
) -> ServiceProcesses:
    """The session's service called ``name``; call only from session-scoped fixtures."""
    if name not in _RUNNING:
        stack = ExitStack()
        _RUNNING[name] = stack.enter_context(live_service(workers=workers, **env))

        def stop() -> None:
            _RUNNING.pop(name, None)
            stack.close()

        request.addfinalizer(stop)
    return _RUNNING[name]
