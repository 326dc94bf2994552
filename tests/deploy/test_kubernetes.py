"""The Kustomize base and its production overlay: objects, images, ports, probes, GPUs,
secrets, weights, grace periods and KEDA autoscaling, cross-checked against the code (route
paths, settings, models, RQ queue keys, the placeholder refusal).

The workers run in pools (``worker-pools/``), one Deployment and one KEDA ScaledObject each:
a pool holds the models of its ``SPASEMSR_WORKER__MODELS`` and scales on exactly the queues
of those models, whose keys are computed here from ``core.queue`` so that they cannot drift.
"""

from __future__ import annotations

import base64
import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis import Redis

from app.main import create_app
from app.metrics import route_template
from cli.serve import HAND_BACK_MARGIN_SECONDS
from core.jobs import Priority
from core.models import ALL_MODELS, ModelName, default_model, worker_models
from core.queue import JobQueue
from core.secrets_check import RefusedToStart, refuse_placeholder_api_keys
from core.settings import Settings
from tests.conftest import ROOT
from tests.deploy.conftest import (
    KUBERNETES,
    KUSTOMIZE_BASE,
    PRODUCTION,
    SECRET_NAME,
    SECRETS_ENV,
    Objects,
    by_kind_and_name,
    load_documents,
    read_env_file,
    render_kustomization,
    setting_variables,
    without_name_hashes,
)


def _container(objects: Objects, kind: str, name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = objects[(kind, name)]["spec"]["template"]["spec"][
        "containers"
    ]
    assert len(containers) == 1
    return containers[0]


def _ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


WORKER_APP = "spasemsr-worker"
POOL_LABEL = "spasemsr/pool"
# At least these pools: a GPU pool dedicated to each of these models alone.
DEDICATED_POOLS = {
    "spasemsr-worker-spasemsr": (ModelName.SPASEMSR,),
    "spasemsr-worker-realesrgan-x4plus": (ModelName.REALESRGAN_X4PLUS,),
}


def _secret_env(objects: Objects) -> dict[str, str]:
    data = objects[("Secret", SECRET_NAME)]["data"]
    return {key: base64.b64decode(value).decode() for key, value in data.items()}


def _config_env(objects: Objects) -> dict[str, str]:
    return {**objects[("ConfigMap", "spasemsr-config")]["data"], **_secret_env(objects)}


def _image_name(container: dict[str, Any]) -> str:
    name: str = container["image"].partition(":")[0]
    return name


def _pool_names(objects: Objects) -> list[str]:
    """Worker Deployments: their pods carry the worker app label."""
    return sorted(
        name
        for (kind, name), obj in objects.items()
        if kind == "Deployment"
        and obj["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name")
        == WORKER_APP
    )


def _pool_settings(objects: Objects, name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a pool's worker process starts with: config, secret, then its own env."""
    container = _container(objects, "Deployment", name)
    env = {**_config_env(objects), **{e["name"]: e["value"] for e in container.get("env", [])}}
    with monkeypatch.context() as patch:
        for key, value in env.items():
            assert key.startswith("SPASEMSR_"), key
            patch.setenv(key, str(value))
        return Settings()


def _served(objects: Objects, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[ModelName, ...]]:
    """Each pool's models, as the worker reads them (``core.models.worker_models``)."""
    served = {}
    for name in _pool_names(objects):
        container = _container(objects, "Deployment", name)
        names = {e["name"] for e in container.get("env", [])}
        # Explicit, never "empty = every model": a pool's GPU memory is sized for its models.
        assert "SPASEMSR_WORKER__MODELS" in names, name
        served[name] = worker_models(_pool_settings(objects, name, monkeypatch))
    return served


def test_base_has_every_object(objects_kinds: set[tuple[str, str]]) -> None:
    assert {
        ("Namespace", "spasemsr"),
        ("ConfigMap", "spasemsr-config"),
        ("Secret", SECRET_NAME),
        ("PersistentVolumeClaim", "spasemsr-weights"),
        ("Service", "redis"),
        ("StatefulSet", "redis"),
        ("Service", "api"),
        ("Deployment", "spasemsr-api"),
        ("Service", "spasemsr-worker-metrics"),
    } <= objects_kinds
    for pool in DEDICATED_POOLS:
        assert {("Deployment", pool), ("ScaledObject", pool)} <= objects_kinds


@pytest.fixture
def objects_kinds(k8s_objects: Objects) -> set[tuple[str, str]]:
    return set(k8s_objects)


def test_config_is_valid_settings(k8s_objects: Objects, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _config_env(k8s_objects)
    for key, value in data.items():
        assert key.startswith("SPASEMSR_")
        monkeypatch.setenv(key, str(value))
    settings = Settings()
    assert settings.redis.url == "redis://redis:6379/0"  # the redis Service
    assert settings.storage.backend == "s3"
    assert settings.worker.metrics_host == "0.0.0.0"
    assert settings.storage.s3_secret_access_key is not None
    # The API's default model is chosen explicitly, not left to whether a path is set.
    assert "SPASEMSR_MODEL__DEFAULT" in data
    assert default_model(settings) is ModelName(data["SPASEMSR_MODEL__DEFAULT"])


def test_services_select_their_pods_and_ports(k8s_objects: Objects) -> None:
    workloads = [
        ("api", "Deployment", "spasemsr-api"),
        ("redis", "StatefulSet", "redis"),
        *(("spasemsr-worker-metrics", "Deployment", p) for p in _pool_names(k8s_objects)),
    ]
    for service_name, kind, workload in workloads:
        service = k8s_objects[("Service", service_name)]["spec"]
        pod_labels = k8s_objects[(kind, workload)]["spec"]["template"]["metadata"]["labels"]
        assert service["selector"].items() <= pod_labels.items(), service_name
        ports = _ports(_container(k8s_objects, kind, workload))
        for port in service["ports"]:
            assert ports[port["targetPort"]] == port["port"], service_name


def test_api_deployment(k8s_objects: Objects, kustomization: dict[str, Any]) -> None:
    container = _container(k8s_objects, "Deployment", "spasemsr-api")
    assert _image_name(container) == "spasemsr-api"
    assert "spasemsr-api" in {image["name"] for image in kustomization["images"]}
    assert _ports(container) == {"http": 8000}
    app = create_app(Settings())

    def served(path: str) -> bool:
        scope = {"type": "http", "method": "GET", "path": path, "app": app, "root_path": ""}
        return route_template(scope) == path

    for probe in ("readinessProbe", "livenessProbe"):
        assert served(container[probe]["httpGet"]["path"])
        assert container[probe]["httpGet"]["port"] == "http"
    # Readiness never waits for a warm worker, or workers scaled to zero would never return.
    assert container["readinessProbe"]["httpGet"]["path"] != "/readyz"
    annotations = k8s_objects[("Deployment", "spasemsr-api")]["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations["prometheus.io/port"] == "8000"
    assert served(annotations["prometheus.io/path"])
    assert not served("/no-such-path")
    refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
    assert refs == {"spasemsr-config", SECRET_NAME}


@pytest.fixture(params=sorted(DEDICATED_POOLS))
def pool(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def test_worker_pool_has_a_gpu_probes_and_metrics(k8s_objects: Objects, pool: str) -> None:
    deployment = k8s_objects[("Deployment", pool)]
    pod = deployment["spec"]["template"]
    container = _container(k8s_objects, "Deployment", pool)
    assert _image_name(container) == "spasemsr-worker"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    config = k8s_objects[("ConfigMap", "spasemsr-config")]["data"]
    assert _ports(container)["metrics"] == int(config["SPASEMSR_WORKER__METRICS_PORT"]) == 9100
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9100"
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["python", "-m", "worker.healthcheck"]
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # model warm-up
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 300  # the running job finishes
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_dedicated_pools_serve_their_model_alone(
    k8s_objects: Objects, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = _served(k8s_objects, monkeypatch)
    for pool, models in DEDICATED_POOLS.items():
        assert served[pool] == models, pool


def test_every_model_is_served_by_exactly_one_pool(
    k8s_objects: Objects, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No queue without a pool (its jobs would wait for ever) and none scaled by two pools."""
    served = _served(k8s_objects, monkeypatch)
    held = [model for models in served.values() for model in models]
    assert sorted(held) == sorted(ALL_MODELS), served
    default = default_model(_pool_settings(k8s_objects, "spasemsr-api", monkeypatch))
    assert default in held


def test_pools_select_only_their_own_pods(k8s_objects: Objects) -> None:
    pools = _pool_names(k8s_objects)
    assert len(pools) >= len(DEDICATED_POOLS)
    for pool in pools:
        selector = k8s_objects[("Deployment", pool)]["spec"]["selector"]["matchLabels"]
        assert selector[POOL_LABEL] and selector["app.kubernetes.io/name"] == WORKER_APP
        for other in pools:
            labels = k8s_objects[("Deployment", other)]["spec"]["template"]["metadata"]["labels"]
            assert (selector.items() <= labels.items()) == (other == pool), (pool, other)


def _pool_shape(objects: Objects, name: str) -> dict[str, Any]:
    """A pool's Deployment without what may differ between pools."""
    deployment = copy.deepcopy(objects[("Deployment", name)])
    deployment["metadata"].pop("name")
    deployment["spec"]["selector"]["matchLabels"].pop(POOL_LABEL)
    pod = deployment["spec"]["template"]
    pod["metadata"]["labels"].pop(POOL_LABEL)
    pod["spec"].pop("nodeSelector", None)
    container = pod["spec"]["containers"][0]
    container.pop("resources")
    container["env"] = [e for e in container["env"] if e["name"] != "SPASEMSR_WORKER__MODELS"]
    return deployment


def test_pools_differ_only_in_models_resources_and_placement(k8s_objects: Objects) -> None:
    """Pools are copies of one another: a probe, mount or grace period fixed in one is fixed
    in all of them."""
    pools = _pool_names(k8s_objects)
    first = _pool_shape(k8s_objects, pools[0])
    for pool in pools[1:]:
        assert _pool_shape(k8s_objects, pool) == first, pool
    for pool in pools:
        limits = k8s_objects[("Deployment", pool)]["spec"]["template"]["spec"]["containers"][0][
            "resources"
        ]["limits"]
        assert limits["nvidia.com/gpu"] == 1, pool  # one worker process per GPU


def test_redis_persists_and_never_evicts(k8s_objects: Objects) -> None:
    statefulset = k8s_objects[("StatefulSet", "redis")]
    args = " ".join(_container(k8s_objects, "StatefulSet", "redis")["args"])
    assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args
    claim = statefulset["spec"]["volumeClaimTemplates"][0]
    mounts = _container(k8s_objects, "StatefulSet", "redis")["volumeMounts"]
    assert mounts[0]["name"] == claim["metadata"]["name"] and mounts[0]["mountPath"] == "/data"
    assert "readinessProbe" in _container(k8s_objects, "StatefulSet", "redis")


def _expected_list_keys(settings: Settings) -> set[str]:
    """The Redis list keys of the queues a worker with these settings serves."""
    queue = JobQueue(Redis(), prefix=settings.redis.key_prefix)  # no connection is opened
    return {
        queue.queue(model, Priority(priority)).key
        for model in worker_models(settings)
        for priority in settings.worker.queues
    }


def test_expected_keys_are_rq_queue_names() -> None:
    """The computation above names RQ's lists: rq:queue:<prefix>-<model>-<priority>."""
    settings = Settings(worker={"models": ["realesrgan-x4plus"], "queues": ["high"]})
    assert _expected_list_keys(settings) == {"rq:queue:spasemsr-realesrgan-x4plus-high"}


def test_keda_scales_each_pool_on_exactly_its_models_queues(
    k8s_objects: Objects, kustomization: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    pools = _pool_names(k8s_objects)
    scaled_objects = {name for kind, name in k8s_objects if kind == "ScaledObject"}
    assert scaled_objects == set(pools)  # one ScaledObject per pool, none for anything else
    default = default_model(_pool_settings(k8s_objects, "spasemsr-api", monkeypatch))
    namespace = kustomization["namespace"]
    every_key: list[str] = []
    for pool in pools:
        settings = _pool_settings(k8s_objects, pool, monkeypatch)
        scaled = k8s_objects[("ScaledObject", pool)]["spec"]
        assert scaled["scaleTargetRef"]["name"] == pool
        assert scaled["maxReplicaCount"] >= 1
        assert scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
        # A request naming a model is refused while no live worker holds it: a pool at zero
        # would never see its queue grow. Only a pool holding the default model may sleep.
        if default not in worker_models(settings):
            assert scaled["minReplicaCount"] >= 1, pool
        triggers = scaled["triggers"]
        assert {t["type"] for t in triggers} == {"redis"}, pool
        names = [t["metadata"]["listName"] for t in triggers]
        assert len(names) == len(set(names)), pool
        assert set(names) == _expected_list_keys(settings), pool
        every_key += names
        for trigger in triggers:
            assert trigger["metadata"]["address"] == f"redis.{namespace}.svc.cluster.local:6379"
            assert int(trigger["metadata"]["listLength"]) >= 1
    assert len(every_key) == len(set(every_key))  # no queue scales two pools


# --- rendering: kubectl builds what these tests read -----------------------------------------


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the kustomizations are rendered by conftest.py only")
    return kubectl


def _kubectl_kustomize(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _unwrapped_secret_data(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """kubectl folds long base64 values over lines; the bytes are the same."""
    for obj in objects:
        if obj["kind"] == "Secret":
            obj["data"] = {k: "".join(v.split()) for k, v in obj.get("data", {}).items()}
    return objects


@pytest.mark.parametrize("which", ["base", "production"])
def test_kubectl_kustomize_renders_the_objects_the_tests_read(
    which: str, production_dir: Path
) -> None:
    directory = KUSTOMIZE_BASE if which == "base" else production_dir
    built = _kubectl_kustomize(directory)
    assert built.returncode == 0, built.stderr
    rendered = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    theirs = by_kind_and_name(_unwrapped_secret_data(without_name_hashes(rendered, {SECRET_NAME})))
    assert theirs == by_kind_and_name(render_kustomization(directory))
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "spasemsr", doc["metadata"]["name"]
    if which == "production":
        # The generated name carries a hash of the content: a changed secrets.env rolls the
        # pods that read it, and every reference follows the name.
        (secret,) = [doc["metadata"]["name"] for doc in rendered if doc["kind"] == "Secret"]
        assert secret.startswith(f"{SECRET_NAME}-") and secret in built.stdout.split()


# --- secrets: none in the repository, the operator's own or a refusal -----------------------


def _pod_specs(objects: Objects) -> list[dict[str, Any]]:
    return [
        obj["spec"]["template"]["spec"]
        for obj in objects.values()
        if "template" in obj.get("spec", {})
    ]


def test_the_base_ships_no_credentials(base_objects: Objects) -> None:
    assert [key for key in base_objects if key[0] == "Secret"] == []
    readers = 0
    for pod in _pod_specs(base_objects):
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    readers += 1
                    # Not optional: a pod never starts without the operator's secret.
                    assert source["secretRef"] == {"name": SECRET_NAME}
    assert readers == 1 + len(_pool_names(base_objects))  # the API and every pool


def test_the_overlay_generates_the_secret_from_the_operators_file(
    kustomization: dict[str, Any],
) -> None:
    overlay = yaml.safe_load((PRODUCTION / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../../base"]
    assert overlay["namespace"] == kustomization["namespace"]  # beside the pods that read it
    assert overlay["secretGenerator"] == [{"name": SECRET_NAME, "envs": [SECRETS_ENV]}]
    assert not overlay.get("generatorOptions", {}).get("disableNameSuffixHash")
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: cannot ask git whether secrets.env is ignored")
    path = str((PRODUCTION / SECRETS_ENV).relative_to(ROOT))
    ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
    assert ignored.returncode == 0, f"{path} must be ignored by git"
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", path], cwd=ROOT, capture_output=True, check=False
    )
    assert tracked.returncode != 0, f"{path} is committed"


def test_the_overlay_does_not_build_without_the_operators_secrets(tmp_path: Path) -> None:
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, copy, ignore=shutil.ignore_patterns(SECRETS_ENV))
    built = _kubectl_kustomize(copy / PRODUCTION.relative_to(KUBERNETES))
    assert built.returncode != 0
    assert SECRETS_ENV in built.stderr


def test_the_example_secrets_are_refused_at_start_up(
    k8s_objects: Objects, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copied unchanged, the example still cannot serve: its key is a placeholder."""
    example = read_env_file(PRODUCTION / "secrets.env.example")
    assert set(example) == set(_secret_env(k8s_objects))  # it shows every value to set
    with monkeypatch.context() as patch:
        for key, value in example.items():
            patch.setenv(key, value)
        settings = Settings()
    with pytest.raises(RefusedToStart, match="change-me"):
        refuse_placeholder_api_keys(settings.api)


def test_every_variable_is_a_setting(k8s_objects: Objects) -> None:
    names = set(_config_env(k8s_objects))
    names |= set(read_env_file(PRODUCTION / "secrets.env.example"))
    for pod in _pod_specs(k8s_objects):
        for container in pod["containers"]:
            names |= {e["name"] for e in container.get("env", [])}
    assert names <= setting_variables(), names - setting_variables()


# --- workers: weights, data folder, grace period, one per GPU -------------------------------


def _volume_mount(pod: dict[str, Any], predicate: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The one volume of the pod that ``predicate`` accepts, and its mount in the container."""
    (volume,) = [v for v in pod["volumes"] if predicate(v)]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    return volume, mount


def test_workers_read_the_weights_from_the_weights_volume(
    k8s_objects: Objects, monkeypatch: pytest.MonkeyPatch
) -> None:
    claim = k8s_objects[("PersistentVolumeClaim", "spasemsr-weights")]["spec"]
    # Every worker pod on every node mounts it.
    assert set(claim["accessModes"]) & {"ReadWriteMany", "ReadOnlyMany"}
    for pool in _pool_names(k8s_objects):
        pod = k8s_objects[("Deployment", pool)]["spec"]["template"]["spec"]
        volume, mount = _volume_mount(
            pod, lambda v: v.get("persistentVolumeClaim", {}).get("claimName") == "spasemsr-weights"
        )
        assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True
        settings = _pool_settings(k8s_objects, pool, monkeypatch)
        assert settings.model.path is not None
        assert settings.model.path.is_relative_to(mount["mountPath"]), pool
    # The SpaSemSR pool serves the pipeline on that volume, never the untrained demo one.
    spasemsr = _pool_settings(k8s_objects, "spasemsr-worker-spasemsr", monkeypatch)
    assert ModelName.SPASEMSR in worker_models(spasemsr) and spasemsr.model.path is not None


def test_the_workers_data_folder_is_a_writable_volume(
    k8s_objects: Objects, monkeypatch: pytest.MonkeyPatch
) -> None:
    for pool in _pool_names(k8s_objects):
        pod = k8s_objects[("Deployment", pool)]["spec"]["template"]["spec"]
        _, mount = _volume_mount(pod, lambda v: "emptyDir" in v)
        assert not mount.get("readOnly")
        assert _pool_settings(k8s_objects, pool, monkeypatch).var_dir == Path(mount["mountPath"])


def test_the_pod_grace_period_is_the_workers_own_plus_the_hand_back(
    k8s_objects: Objects, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kubernetes kills a pod terminationGracePeriodSeconds after SIGTERM. The worker lets its
    job run shutdown_grace_seconds, then hands it back at its next step: the pod's grace must
    cover both, and no more than a step's margin beyond them, or every rollout requeues jobs
    that were allowed to finish (or waits for nothing)."""
    for pool in _pool_names(k8s_objects):
        grace = k8s_objects[("Deployment", pool)]["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"
        ]
        shutdown = _pool_settings(k8s_objects, pool, monkeypatch).worker.shutdown_grace_seconds
        assert HAND_BACK_MARGIN_SECONDS <= grace - shutdown <= 120, (pool, grace, shutdown)


def test_one_worker_process_per_gpu(k8s_objects: Objects) -> None:
    assert (ROOT / "worker" / "__main__.py").exists()  # `python -m worker`: one process
    for pool in _pool_names(k8s_objects):
        pod = k8s_objects[("Deployment", pool)]["spec"]["template"]["spec"]
        assert "initContainers" not in pod
        container = _container(k8s_objects, "Deployment", pool)  # the only container
        assert container["command"] == ["python", "-m", "worker"]
        resources = container["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert resources.get("requests", {}).get("nvidia.com/gpu", 1) == 1


def test_the_weights_loader_fills_the_workers_volume_as_their_user(k8s_objects: Objects) -> None:
    (loader,) = load_documents(KUBERNETES / "weights-loader.yaml")
    assert loader["metadata"]["namespace"] == "spasemsr"
    (volume,) = loader["spec"]["volumes"]
    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in k8s_objects
    (mount,) = loader["spec"]["containers"][0]["volumeMounts"]
    assert not mount.get("readOnly")  # the one writer
    for pool in _pool_names(k8s_objects):
        workers = k8s_objects[("Deployment", pool)]["spec"]["template"]["spec"]
        assert (
            loader["spec"]["securityContext"]["runAsUser"]
            == workers["securityContext"]["runAsUser"]
        )
