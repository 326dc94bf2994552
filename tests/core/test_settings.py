from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from core.settings import Settings


def test_defaults_are_the_embedded_single_machine_setup() -> None:
    settings = Settings()
    assert settings.redis.url is None
    assert settings.storage.backend == "local"
    assert settings.storage_root() == Path("var") / "storage"
    assert settings.api.port == 8000


def test_nested_sections_read_from_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPASEMSR_REDIS__URL", "redis://example:6380/2")
    monkeypatch.setenv("SPASEMSR_STORAGE__BACKEND", "s3")
    monkeypatch.setenv("SPASEMSR_STORAGE__S3_SECRET_ACCESS_KEY", "hidden")
    monkeypatch.setenv("SPASEMSR_API__PORT", "9001")
    monkeypatch.setenv("SPASEMSR_WORKER__QUEUES", '["high"]')
    settings = Settings()
    assert settings.redis.url == "redis://example:6380/2"
    assert settings.storage.backend == "s3"
    assert settings.api.port == 9001
    assert settings.worker.queues == ("high",)
    assert "hidden" not in repr(settings)  # secrets never appear in logs


def test_out_of_range_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPASEMSR_API__PORT", "70000")
    with pytest.raises(ValidationError):
        Settings()
