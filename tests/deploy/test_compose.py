"""docker-compose.yml and the Dockerfile with the observability stack (no Docker engine or
`docker compose` here: the files are parsed, the variables substituted as compose does, and
the result cross-checked against each other, against deploy/ and against the settings)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli.serve import HAND_BACK_MARGIN_SECONDS
from core.models import ModelName, default_model, worker_models
from core.secrets_check import refuse_placeholder_api_keys, refuse_unusable_api_keys
from core.settings import Settings
from tests.conftest import ROOT
from tests.deploy.conftest import DEPLOY, setting_variables
from tests.deploy.test_make_env import make_env_module

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, $NAME and $$ (a
# literal $), as the compose specification defines interpolation.
_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)
_REQUIRED = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]+\}")
# Environment entries that carry a credential: each must be required, never defaulted.
_CREDENTIAL = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|API__KEYS|ROOT_USER|MINIO_USER|TOKEN")
OPERATOR_ONLY = ("minio", "prometheus", "grafana")


class MissingVariable(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"required variable {name} is missing a value: {message}")
        self.name = name


def interpolate(text: str, env: Mapping[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match["name"] or match["bare"]
        op, arg = match["op"], match["arg"] or ""
        value = env.get(name)
        unset = value is None or (value == "" and op in (":-", ":?"))
        if unset and op in (":-", "-"):
            return arg
        if unset and op in (":?", "?"):
            raise MissingVariable(name, arg)
        return value or ""

    return _INTERPOLATION.sub(substitute, text)


def _strings(node: Any) -> Iterator[str]:
    """Every string value of the parsed file (compose interpolates values, not keys)."""
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def _variables(compose: dict[str, Any]) -> dict[str, set[str]]:
    """Variable name -> the operators it is used with ('' for none)."""
    used: dict[str, set[str]] = {}
    for text in _strings(compose):
        for match in _INTERPOLATION.finditer(text):
            if match.group(0) != "$$":
                used.setdefault(match["name"] or match["bare"], set()).add(match["op"] or "")
    return used


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path of a service's bind mounts and volumes."""
    mounts: dict[str, str] = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        mounts[target] = source
    return mounts


def _containers_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("\n## Containers\n", 1)[1].split("\n## ", 1)[0]


@pytest.fixture(scope="session")
def env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .env the documented first-run command writes."""
    path = tmp_path_factory.mktemp("compose") / ".env"
    assert make_env_module().main(["compose", "--env-file", str(path)]) == 0
    return path


@pytest.fixture(scope="session")
def compose_env(env_file: Path) -> dict[str, str]:
    values: dict[str, str] = make_env_module().read_env_file(env_file)
    return values


def _settings(
    service: dict[str, Any], env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The settings a service starts with: its environment, with the variables of ``env`` (the
    generated .env) substituted and every other variable at its default."""
    with monkeypatch.context() as patch:
        for key, value in service["environment"].items():
            patch.setenv(key, interpolate(str(value), env))
        return Settings()


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
    assert not published["redis"] and not published["worker"]
    for name in ("redis", "minio", "prometheus", "grafana"):
        assert services[name]["healthcheck"]["test"], f"{name} has no health check"
    # Named volumes are declared; the stack keeps Redis, objects and metrics across restarts.
    declared = set(compose["volumes"])
    for name in ("redis", "minio", "worker", "prometheus", "grafana"):
        named = [v for v in _mounts(services[name]).values() if not v.startswith(".")]
        assert named and set(named) <= declared, name


# --- first run, credentials and variables ---------------------------------------------------


def test_without_the_env_file_compose_stops_and_says_what_to_run(compose: dict[str, Any]) -> None:
    with pytest.raises(MissingVariable, match=r"python3 deploy/make_env\.py compose"):
        for text in _strings(compose):
            interpolate(text, {})


def test_the_first_run_command_provides_every_required_variable(
    compose: dict[str, Any], compose_env: dict[str, str]
) -> None:
    required = {name for name, ops in _variables(compose).items() if ":?" in ops or "?" in ops}
    assert required == set(make_env_module().COMPOSE_VARIABLES)
    assert required <= set(compose_env)
    for text in _strings(compose):
        interpolate(text, compose_env)  # nothing missing
    assert len(compose_env["S3_SECRET_KEY"]) >= 8  # MinIO's minimum for its root password


def test_the_generated_key_lets_the_api_and_the_worker_start(
    compose: dict[str, Any], compose_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    api = _settings(compose["services"]["api"], compose_env, monkeypatch)
    worker = _settings(compose["services"]["worker"], compose_env, monkeypatch)
    assert api.api.auth_required and len(api.api.keys) == 1
    refuse_unusable_api_keys(api.api)
    refuse_placeholder_api_keys(worker.api)
    assert api.storage.s3_access_key_id is not None
    assert api.storage.s3_access_key_id.get_secret_value() == compose_env["S3_ACCESS_KEY"]


def test_no_credential_has_a_default(compose: dict[str, Any]) -> None:
    checked = 0
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if _CREDENTIAL.search(key):
                checked += 1
                assert _REQUIRED.fullmatch(str(value)), (name, key, value)
    assert checked >= 8  # S3 (api, worker), MinIO, bucket job, Grafana, API keys
    for name, ops in _variables(compose).items():
        if _CREDENTIAL.search(name) or name.endswith("_KEY"):
            assert ops <= {":?", "?"}, name


def test_every_variable_is_documented(compose: dict[str, Any]) -> None:
    documented = (DEPLOY / "README.md").read_text() + _containers_section()
    for name in _variables(compose):
        assert f"`{name}`" in documented, f"${{{name}}} is not documented"


def test_every_spasemsr_variable_is_a_setting(compose: dict[str, Any]) -> None:
    known = setting_variables()
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if key.startswith("SPASEMSR_"):
                assert key in known, (name, key)
            # A variable of a setting's name is passed to that setting, under the same name:
            # one spelling for the operator, the settings and the documentation.
            for match in _INTERPOLATION.finditer(str(value)):
                variable = match["name"] or match["bare"] or ""
                if variable.startswith("SPASEMSR_"):
                    assert variable == key and variable in known, (name, key, variable)
    documented = (DEPLOY / "README.md").read_text() + _containers_section()
    mentioned = set(re.findall(r"\bSPASEMSR_[A-Z0-9_]*[A-Z0-9]\b", documented))
    assert mentioned <= known, mentioned - known


def test_the_images_settings_are_settings() -> None:
    for name, stage in _dockerfile_stages().items():
        for variable in re.findall(r"\b(SPASEMSR_[A-Z0-9_]+)=", stage):
            assert variable in setting_variables(), (name, variable)


def test_operator_only_ports_are_bound_to_this_host(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in (*OPERATOR_ONLY, "api"):
        for port in services[name]["ports"]:
            assert interpolate(str(port), {}).startswith("127.0.0.1:"), (name, port)
    for name in OPERATOR_ONLY:  # never opened by a variable
        assert all("$" not in str(port) for port in services[name]["ports"]), name


# --- storage, metrics, dashboards -------------------------------------------------------------


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
    # The home dashboard is the provisioned file, as the container sees it.
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (ROOT / mounts[str(home.parent)] / home.name).is_file()
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"


# --- the worker ----------------------------------------------------------------------------------


def test_worker_reserves_a_gpu_and_redis_never_evicts(compose: dict[str, Any]) -> None:
    services = compose["services"]
    device = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert device["count"] == 1  # one worker process per GPU; --scale worker=N for more
    command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command


def test_the_worker_serves_the_apis_default_model(
    compose: dict[str, Any], compose_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    assert "SPASEMSR_MODEL__UPSCALER" not in services["api"]["environment"]
    assert "SPASEMSR_MODEL__UPSCALER" not in services["worker"]["environment"]
    # Both explicit: the default does not hinge on SPASEMSR_MODEL__PATH, and the worker's GPU
    # memory holds a chosen set, not "every model".
    assert "SPASEMSR_MODEL__DEFAULT" in services["api"]["environment"]
    assert "SPASEMSR_WORKER__MODELS" in services["worker"]["environment"]
    api = _settings(services["api"], compose_env, monkeypatch)
    worker = _settings(services["worker"], compose_env, monkeypatch)
    assert worker.worker.models, "the worker names its models"
    assert default_model(api) in worker_models(worker)
    # The SpaSemSR model is only served with a trained pipeline (SPASEMSR_MODEL__PATH), never
    # the untrained demo one.
    assert ModelName.SPASEMSR not in worker_models(worker) or worker.model.path is not None


def _seconds(duration: str) -> float:
    """A compose duration such as 2m, 90s or 1m30s."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


def test_docker_waits_for_the_workers_grace_and_its_hand_back(
    compose: dict[str, Any], compose_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = compose["services"]["worker"]
    shutdown = _settings(worker, compose_env, monkeypatch).worker.shutdown_grace_seconds
    margin = _seconds(worker["stop_grace_period"]) - shutdown
    assert HAND_BACK_MARGIN_SECONDS <= margin <= 120, (worker["stop_grace_period"], shutdown)


def test_the_workers_volume_is_its_data_folder_owned_by_its_user(
    compose: dict[str, Any], compose_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new named volume takes the owner of the image folder it is mounted on; on a path the
    image lacks, Docker creates the folder root-owned and the worker (uid 10001) cannot write
    its converted weights there."""
    worker = compose["services"]["worker"]
    var_dir = _settings(worker, compose_env, monkeypatch).var_dir
    assert _mounts(worker)[str(var_dir)] in compose["volumes"]
    stage = _dockerfile_stages()["worker"]
    assert f"SPASEMSR_VAR_DIR={var_dir}" in stage  # the image's own data folder
    before_user = stage.split("\nUSER spasemsr", 1)[0]
    owner = r"(?:spasemsr|10001)"
    created = re.search(
        rf"install -d[^\n]*-o {owner}[^\n]*\s{re.escape(str(var_dir))}(?:\s|$)"
        rf"|mkdir -p[^\n]*{re.escape(str(var_dir))}[^\n]*chown[^\n]*{owner}",
        before_user,
        re.M,
    )
    assert created, f"the worker image must create {var_dir} owned by spasemsr (uid 10001)"


# --- the images -------------------------------------------------------------------------------


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
