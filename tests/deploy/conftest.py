"""Fixtures for the deployment files: the parsed compose, Kubernetes and Grafana material.

Kustomize directories are rendered here in Python (``render_kustomization``: resources,
generators, namespace, labels, images: what this repository's kustomizations use), so the
checks run where ``kubectl`` is not installed; where it is, tests/deploy/test_kubernetes.py
proves that ``kubectl kustomize`` renders the same objects.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from core.settings import Settings
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "spasemsr.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "spasemsr.rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "spasemsr.json"
KUBERNETES = DEPLOY / "kubernetes"
KUSTOMIZE_BASE = KUBERNETES / "base"
PRODUCTION = KUBERNETES / "overlays" / "production"
SECRETS_ENV = "secrets.env"  # the operator's file the production overlay reads
SECRET_NAME = "spasemsr-secrets"
# The API key of the secrets.env the tests write (a value of their own, not a placeholder).
TEST_API_KEY = "tests-deploy-" + hashlib.sha256(b"tests/deploy").hexdigest()[:24]

Objects = dict[tuple[str, str], dict[str, Any]]
# Kinds without a namespace among those this repository ships.
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole"}


def setting_variables() -> set[str]:
    """Every environment variable that sets a field of ``core.settings.Settings``: prefix
    ``SPASEMSR_``, ``__`` between a section and its field."""
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            names |= {f"SPASEMSR_{name}__{sub}".upper() for sub in section.model_fields}
        else:
            names.add(f"SPASEMSR_{name}".upper())
    return names


@pytest.fixture(scope="session")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip(
            "promtool not installed: Debian's `prometheus` package provides it "
            "(`make system-deps` installs it as root)"
        )
    return found


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def read_env_file(path: Path) -> dict[str, str]:
    """A kustomize env file: KEY=VALUE lines, '#' comments; values taken as written."""
    pairs: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            pairs[name.strip()] = value
    return pairs


def _generated_secret(directory: Path, generator: dict[str, Any]) -> dict[str, Any]:
    pairs: dict[str, str] = {}
    for env in generator.get("envs", []):
        pairs.update(read_env_file(directory / env))
    for literal in generator.get("literals", []):
        name, _, value = literal.partition("=")
        pairs[name] = value
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": generator["name"]},
        "type": generator.get("type", "Opaque"),
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in pairs.items()},
    }


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec", spec)
    containers: list[dict[str, Any]] = pod.get("containers", []) + pod.get("initContainers", [])
    return containers


def _set_images(objects: list[dict[str, Any]], images: list[dict[str, Any]]) -> None:
    for obj in objects:
        for container in _containers(obj):
            name, _, tag = container["image"].partition(":")
            for image in images:
                if image["name"] == name:
                    tag = image.get("newTag", tag)
                    name = image.get("newName", name)
                    container["image"] = f"{name}:{tag}" if tag else name


def render_kustomization(directory: Path, *, set_images: bool = True) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize directory`` builds, without the generated names' hash
    suffix: resources (files and directories), secret generators, namespace, labels, and the
    ``images`` transform unless ``set_images`` is false (images as the resources name them)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        if path.is_dir():
            objects += render_kustomization(path, set_images=set_images)
        else:
            objects += load_documents(path)
    objects += [_generated_secret(directory, g) for g in kustomization.get("secretGenerator", [])]
    for obj in objects:
        metadata = obj.setdefault("metadata", {})
        if "namespace" in kustomization and obj["kind"] not in CLUSTER_SCOPED:
            metadata["namespace"] = kustomization["namespace"]
        for label in kustomization.get("labels", []):
            metadata.setdefault("labels", {}).update(label["pairs"])
    if set_images:
        _set_images(objects, kustomization.get("images", []))
    return objects


def by_kind_and_name(objects: list[dict[str, Any]]) -> Objects:
    keyed: Objects = {}
    for doc in objects:
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in keyed, f"{key} defined twice"
        keyed[key] = doc
    return keyed


def write_test_secrets(overlay: Path) -> None:
    """The operator's secrets.env, with values of the tests' own."""
    key_entry = (
        f'[{{"name": "tests", "sha256": "{hashlib.sha256(TEST_API_KEY.encode()).hexdigest()}"}}]'
    )
    (overlay / SECRETS_ENV).write_text(
        "SPASEMSR_STORAGE__S3_ACCESS_KEY_ID=tests-access-key\n"
        "SPASEMSR_STORAGE__S3_SECRET_ACCESS_KEY=tests-secret-access-key\n"
        f"SPASEMSR_API__KEYS={key_entry}\n"
    )


@pytest.fixture(scope="session")
def kubernetes_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/kubernetes copied, with the production overlay's secrets.env written in."""
    copy = tmp_path_factory.mktemp("kubernetes") / "kubernetes"
    shutil.copytree(KUBERNETES, copy, ignore=shutil.ignore_patterns(SECRETS_ENV))
    write_test_secrets(copy / PRODUCTION.relative_to(KUBERNETES))
    return copy


@pytest.fixture(scope="session")
def production_dir(kubernetes_copy: Path) -> Path:
    return kubernetes_copy / PRODUCTION.relative_to(KUBERNETES)


@pytest.fixture(scope="session")
def kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((KUSTOMIZE_BASE / "kustomization.yaml").read_text())
    return loaded


@pytest.fixture(scope="session")
def base_objects() -> Objects:
    """Every object of the Kustomize base, by (kind, name); images as the resources name
    them, like ``k8s_objects``."""
    return by_kind_and_name(render_kustomization(KUSTOMIZE_BASE, set_images=False))


@pytest.fixture(scope="session")
def k8s_objects(production_dir: Path) -> Objects:
    """Every object of the production overlay (the base and the generated Secret) as an
    operator deploys it, by (kind, name). Images are left as the resources name them
    (``spasemsr-api``, ``spasemsr-worker``), which the tests compare with the Dockerfile's
    targets; the ``images`` transform is checked against ``kubectl kustomize``."""
    return by_kind_and_name(render_kustomization(production_dir, set_images=False))


_HASH_SUFFIX = re.compile(r"^(?P<name>.+)-[a-z0-9]{10}$")


def without_name_hashes(objects: list[dict[str, Any]], generated: set[str]) -> list[dict[str, Any]]:
    """kubectl's objects with the hash suffix taken off the generated names and references."""
    renames = {}
    for obj in objects:
        match = _HASH_SUFFIX.match(obj["metadata"]["name"])
        if match and match["name"] in generated:
            renames[obj["metadata"]["name"]] = match["name"]

    def rename(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: rename(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rename(v) for v in value]
        return renames.get(value, value) if isinstance(value, str) else value

    renamed: list[dict[str, Any]] = rename(objects)
    return renamed
