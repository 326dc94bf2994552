"""Live services for the client tests (shared with the CLI and web tests)."""

from __future__ import annotations

import pytest

from tests.client.live import IDLE_ENV, shared_service
from tests.conftest import ServiceProcesses


@pytest.fixture(scope="session")
def service(request: pytest.FixtureRequest) -> ServiceProcesses:
    """API + one Lanczos worker."""
    return shared_service(request, "lanczos")


@pytest.fixture(scope="session")
def idle_service(request: pytest.FixtureRequest) -> ServiceProcesses:
    """API without any worker, a queue of one job, Retry-After 1 s. Tests leave it empty."""
    return shared_service(request, "idle", workers=0, **IDLE_ENV)
