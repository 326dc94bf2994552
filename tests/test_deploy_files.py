"""The container files, checked as far as a machine without a Docker engine allows."""

from __future__ import annotations

import re

import yaml

from tests.conftest import ROOT


def test_compose_has_the_stack() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "minio", "create-bucket", "api", "worker"} <= set(services)
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "noeviction" in redis_command
    assert services["api"]["build"]["target"] == "api"
    assert services["worker"]["build"]["target"] == "worker"
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["SPASEMSR_REDIS__URL"] == "redis://redis:6379/0"
        assert env["SPASEMSR_STORAGE__BACKEND"] == "s3"
        assert env["SPASEMSR_API__AUTH_REQUIRED"] == "true"  # keys required in production


def test_dockerfile_targets_are_non_root_with_health_checks() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    targets = {stage.split()[2]: stage for stage in stages}
    assert set(targets) == {"api", "worker"}
    for stage in targets.values():
        assert re.search(r"^USER spasemsr$", stage, re.M)
        assert "HEALTHCHECK" in stage
    assert "torch" not in targets["api"]
    assert "torch==" in targets["worker"]
