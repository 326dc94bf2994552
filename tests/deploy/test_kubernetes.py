"""The Kustomize base: objects, images, ports, probes, GPUs, secrets and KEDA autoscaling,
cross-checked against the code (route paths, settings, RQ queue keys)."""

from __future__ import annotations

from typing import Any

import pytest
from redis import Redis

from app.main import create_app
from app.metrics import route_template
from core.jobs import Priority
from core.queue import JobQueue
from core.settings import Settings

Objects = dict[tuple[str, str], dict[str, Any]]


def _container(objects: Objects, kind: str, name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = objects[(kind, name)]["spec"]["template"]["spec"][
        "containers"
    ]
    assert len(containers) == 1
    return containers[0]


def _ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def test_base_has_every_object(objects_kinds: set[tuple[str, str]]) -> None:
    assert {
        ("Namespace", "spasemsr"),
        ("ConfigMap", "spasemsr-config"),
        ("Secret", "spasemsr-storage"),
        ("Service", "redis"),
        ("StatefulSet", "redis"),
        ("Service", "api"),
        ("Deployment", "spasemsr-api"),
        ("Deployment", "spasemsr-worker"),
        ("Service", "spasemsr-worker-metrics"),
        ("ScaledObject", "spasemsr-worker"),
    } <= objects_kinds


@pytest.fixture
def objects_kinds(k8s_objects: Objects) -> set[tuple[str, str]]:
    return set(k8s_objects)


def test_config_is_valid_settings(k8s_objects: Objects, monkeypatch: pytest.MonkeyPatch) -> None:
    data = {
        **k8s_objects[("ConfigMap", "spasemsr-config")]["data"],
        **k8s_objects[("Secret", "spasemsr-storage")]["stringData"],
    }
    for key, value in data.items():
        assert key.startswith("SPASEMSR_")
        monkeypatch.setenv(key, str(value))
    settings = Settings()
    assert settings.redis.url == "redis://redis:6379/0"  # the redis Service
    assert settings.storage.backend == "s3"
    assert settings.worker.metrics_host == "0.0.0.0"
    assert settings.storage.s3_secret_access_key is not None


def test_services_select_their_pods_and_ports(k8s_objects: Objects) -> None:
    for service_name, kind, workload in (
        ("api", "Deployment", "spasemsr-api"),
        ("redis", "StatefulSet", "redis"),
        ("spasemsr-worker-metrics", "Deployment", "spasemsr-worker"),
    ):
        service = k8s_objects[("Service", service_name)]["spec"]
        pod_labels = k8s_objects[(kind, workload)]["spec"]["template"]["metadata"]["labels"]
        assert service["selector"].items() <= pod_labels.items(), service_name
        ports = _ports(_container(k8s_objects, kind, workload))
        for port in service["ports"]:
            assert ports[port["targetPort"]] == port["port"], service_name


def test_api_deployment(k8s_objects: Objects, kustomization: dict[str, Any]) -> None:
    container = _container(k8s_objects, "Deployment", "spasemsr-api")
    assert container["image"] == "spasemsr-api"
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
    assert refs == {"spasemsr-config", "spasemsr-storage"}


def test_worker_deployment_has_a_gpu_probes_and_metrics(k8s_objects: Objects) -> None:
    deployment = k8s_objects[("Deployment", "spasemsr-worker")]
    pod = deployment["spec"]["template"]
    container = _container(k8s_objects, "Deployment", "spasemsr-worker")
    assert container["image"] == "spasemsr-worker"
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


def test_redis_persists_and_never_evicts(k8s_objects: Objects) -> None:
    statefulset = k8s_objects[("StatefulSet", "redis")]
    args = " ".join(_container(k8s_objects, "StatefulSet", "redis")["args"])
    assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args
    claim = statefulset["spec"]["volumeClaimTemplates"][0]
    mounts = _container(k8s_objects, "StatefulSet", "redis")["volumeMounts"]
    assert mounts[0]["name"] == claim["metadata"]["name"] and mounts[0]["mountPath"] == "/data"
    assert "readinessProbe" in _container(k8s_objects, "StatefulSet", "redis")


def test_keda_scales_workers_on_the_real_queue_keys(
    k8s_objects: Objects, kustomization: dict[str, Any]
) -> None:
    scaled = k8s_objects[("ScaledObject", "spasemsr-worker")]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "spasemsr-worker"
    assert scaled["maxReplicaCount"] >= 1
    assert scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    queue = JobQueue(Redis(), prefix=Settings().redis.key_prefix)  # no connection is opened
    expected = {queue.queue(priority).key for priority in Priority}
    triggers = scaled["triggers"]
    assert {t["type"] for t in triggers} == {"redis"}
    assert {t["metadata"]["listName"] for t in triggers} == expected
    namespace = kustomization["namespace"]
    for trigger in triggers:
        assert trigger["metadata"]["address"] == f"redis.{namespace}.svc.cluster.local:6379"
        assert int(trigger["metadata"]["listLength"]) >= 1
