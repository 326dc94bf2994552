"""Fixtures for the deployment files: the parsed compose, Kubernetes and Grafana material."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "spasemsr.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "spasemsr.rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "spasemsr.json"
KUSTOMIZE_BASE = DEPLOY / "kubernetes" / "base"


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


@pytest.fixture(scope="session")
def kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((KUSTOMIZE_BASE / "kustomization.yaml").read_text())
    return loaded


@pytest.fixture(scope="session")
def k8s_objects(kustomization: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of the Kustomize base, by (kind, name)."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        for doc in load_documents(KUSTOMIZE_BASE / resource):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} defined twice"
            objects[key] = doc
    return objects
