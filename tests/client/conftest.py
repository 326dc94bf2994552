"""Live services for the client tests (shared with the CLI and web tests)."""

from __future__ import annotations

import pytest
from redis import Redis

from tests.client.live import IDLE_ENV, shared_service
from tests.conftest import ServiceProcesses


@pytest.fixture(scope="session")
def service(request: pytest.FixtureRequest) -> ServiceProcesses:
    """API + one Lanczos worker."""
    return shared_service(request, "lanczos")


@pytest.fixture(scope="session")
def idle_service_processes(request: pytest.FixtureRequest) -> ServiceProcesses:
    return shared_service(request, "idle", workers=0, **IDLE_ENV)


@pytest.fixture
def idle_service(idle_service_processes: ServiceProcesses) -> ServiceProcesses:
    """API without any worker, a queue of one job, Retry-After 1 s; emptied before each test,
    so that a test that failed with a job still queued cannot make the next ones see 429."""
    with Redis.from_url(idle_service_processes.env["SPASEMSR_REDIS__URL"]) as redis:
        redis.flushdb()
    return idle_service_processes
