"""docker-compose.yml and the Dockerfile with the observability stack (no Docker engine here:
the files are parsed and cross-checked against each other and against deploy/)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from core.models import ModelName, default_model, worker_models
from core.settings import Settings
from tests.conftest import ROOT
from tests.deploy.conftest import DEPLOY

_DEFAULTED = re.compile(r"\$\{([A-Z0-9_]+):-([^}]*)\}")


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path of a service's bind mounts and volumes."""
    mounts: dict[str, str] = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        mounts[target] = source
    return mounts


def test_one_command_brings_up_the_whole_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "minio", "create-bucket", "api", "worker", "prometheus", "grafana"} <= set(
        services
    )
    for name in ("api", "worker", "prometheus", "grafana"):
        assert services[name].get("restart") == "unless-stopped", name
    published = {
        name: {str(port).split(":")[-1] for port in service.get("ports", [])}
        for name, service in services.items()
    }
    assert "8000" in published["api"]
    assert "9000" in published["minio"]
    assert "9090" in published["prometheus"]
    assert "3000" in published["grafana"]
    for name in ("redis", "minio", "prometheus", "grafana"):
        assert services[name]["healthcheck"]["test"], f"{name} has no health check"
    # Named volumes are declared; the stack keeps Redis, objects and metrics across restarts.
    declared = set(compose["volumes"])
    for name in ("redis", "minio", "prometheus", "grafana"):
        named = [v for v in _mounts(services[name]).values() if not v.startswith(".")]
        assert named and set(named) <= declared, name


def test_bucket_is_created_at_start(compose: dict[str, Any]) -> None:
    services = compose["services"]
    bucket = services["api"]["environment"]["SPASEMSR_STORAGE__S3_BUCKET"]
    assert f"mc mb --ignore-existing local/{bucket}" in " ".join(
        services["create-bucket"]["command"]
    )
    for name in ("api", "worker"):
        assert (
            services[name]["depends_on"]["create-bucket"]["condition"]
            == "service_completed_successfully"
        )


def test_prometheus_scrapes_the_services_and_loads_the_rules(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    mounts = _mounts(prometheus)
    assert mounts["/etc/prometheus"] == "./deploy/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for pattern in config["rule_files"]:
        assert list((DEPLOY / "prometheus").glob(pattern)), pattern
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api_sd = jobs["spasemsr-api"]["dns_sd_configs"][0]
    worker_sd = jobs["spasemsr-worker"]["dns_sd_configs"][0]
    assert api_sd["names"] == ["api"] and api_sd["port"] == 8000
    assert worker_sd["names"] == ["worker"] and worker_sd["port"] == 9100
    # The worker really listens there: the image's settings and the compose service agree.
    assert "9100" in [str(p) for p in services["worker"]["expose"]]
    worker_stage = _dockerfile_stages()["worker"]
    assert "SPASEMSR_WORKER__METRICS_PORT=9100" in worker_stage
    assert "SPASEMSR_WORKER__METRICS_HOST=0.0.0.0" in worker_stage
    assert re.search(r"^EXPOSE 9100$", worker_stage, re.M)


def test_grafana_is_provisioned_with_the_datasource_and_dashboard(
    compose: dict[str, Any],
) -> None:
    grafana = compose["services"]["grafana"]
    mounts = _mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    dashboards_dir = mounts["/var/lib/grafana/dashboards"]
    assert dashboards_dir == "./deploy/grafana/dashboards"
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "spasemsr.yml").read_text()
    )["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert list((ROOT / dashboards_dir).glob("*.json"))
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_worker_reserves_a_gpu_and_redis_never_evicts(compose: dict[str, Any]) -> None:
    services = compose["services"]
    device = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command


def _settings(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a service starts with when none of the stack's variables is set: compose
    substitutes each `${NAME:-default}` with its default."""
    with monkeypatch.context() as patch:
        for key, value in service["environment"].items():
            assert "$" not in _DEFAULTED.sub("", str(value)), (key, value)  # defaults only
            patch.setenv(key, _DEFAULTED.sub(lambda m: m.group(2), str(value)))
        return Settings()


def test_the_worker_serves_the_apis_default_model(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    assert "SPASEMSR_MODEL__UPSCALER" not in services["api"]["environment"]
    assert "SPASEMSR_MODEL__UPSCALER" not in services["worker"]["environment"]
    # Both explicit: the default does not hinge on SPASEMSR_MODEL__PATH, and the worker's GPU
    # memory holds a chosen set, not "every model".
    assert "SPASEMSR_MODEL__DEFAULT" in services["api"]["environment"]
    assert "SPASEMSR_WORKER__MODELS" in services["worker"]["environment"]
    api = _settings(services["api"], monkeypatch)
    worker = _settings(services["worker"], monkeypatch)
    assert worker.worker.models, "the worker names its models"
    assert default_model(api) in worker_models(worker)
    # The SpaSemSR model is only served with a trained pipeline (SPASEMSR_MODEL__PATH), never
    # the untrained demo one.
    assert ModelName.SPASEMSR not in worker_models(worker) or worker.model.path is not None


def _dockerfile_stages() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    return {stage.split()[2]: stage for stage in stages}


def test_images_are_non_root_with_health_checks_and_the_right_torch() -> None:
    stages = _dockerfile_stages()
    assert set(stages) == {"api", "worker"}
    for name, stage in stages.items():
        assert re.search(r"^USER spasemsr$", stage, re.M), name
        assert "HEALTHCHECK" in stage, name
    assert "torch" not in stages["api"] and "nvidia" not in stages["api"]
    assert "torch==" in stages["worker"] and "whl/cu" in stages["worker"]
    assert stages["worker"].split()[0].startswith("${CUDA_IMAGE}")
