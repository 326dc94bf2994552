"""The rendered Kubernetes objects against the API's own schemas.

Core kinds: the OpenAPI schemas of Kubernetes 1.37 that the pinned ``kubernetes-validate``
ships, in its strict form (unknown fields are errors, so a misspelt or misplaced field fails
here rather than being dropped by the API server). KEDA's ScaledObject is a CRD that those
schemas lack: it is checked against the models that ``cloudcoil-models-keda`` generates from
KEDA's CRD OpenAPI schema (v2.16), types and required fields, and a dump of the validated
model must give back the object itself, which catches fields the schema does not know.
"""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
from cloudcoil.models.keda.v1alpha1 import ScaledObject

from tests.deploy.conftest import (
    KUBERNETES,
    KUSTOMIZE_BASE,
    Objects,
    load_documents,
    render_kustomization,
)

KUBERNETES_VERSION = "1.37"
KEDA = "keda.sh/v1alpha1"


def _validate_core(obj: dict[str, Any]) -> None:
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(part) for part in error.path)
        pytest.fail(f"{where}: {path}: {error.message}")


def _validate_scaled_object(obj: dict[str, Any]) -> None:
    model = ScaledObject.model_validate(obj)  # raises on a wrong type or a missing field
    assert model.model_dump(by_alias=True, exclude_unset=True) == obj, (
        f"ScaledObject/{obj['metadata']['name']} has fields KEDA's schema does not know"
    )


def validate(obj: dict[str, Any]) -> None:
    if obj["apiVersion"] == KEDA:
        _validate_scaled_object(obj)
    else:
        _validate_core(obj)


def test_the_validator_ships_the_version_checked() -> None:
    assert kubernetes_validate.utils.latest_version().startswith(KUBERNETES_VERSION)


def test_every_rendered_object_is_valid(k8s_objects: Objects) -> None:
    """The production overlay renders the base plus its Secret: every object of both."""
    kinds = {kind for kind, _ in k8s_objects}
    assert {"Deployment", "StatefulSet", "Secret", "ScaledObject"} <= kinds
    for obj in k8s_objects.values():
        validate(obj)


def test_the_base_alone_is_valid() -> None:
    for obj in render_kustomization(KUSTOMIZE_BASE):
        validate(obj)


def test_the_weights_loader_is_valid() -> None:
    for obj in load_documents(KUBERNETES / "weights-loader.yaml"):
        validate(obj)


def _first_pool(objects: Objects, kind: str) -> dict[str, Any]:
    name = min(name for k, name in objects if k == kind and name.startswith("spasemsr-worker-"))
    return objects[(kind, name)]


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        # a field in the wrong place: containers belong to the pod spec, not the template
        ("Deployment", lambda d: d["spec"]["template"].update(containers=[])),
        # a misspelt field
        ("Deployment", lambda d: d["spec"].update(replica=1)),
        # a wrong type
        (
            "Deployment",
            lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds="900"),
        ),
        # KEDA: trigger metadata values are strings
        ("ScaledObject", lambda s: s["spec"]["triggers"][0]["metadata"].update(listLength=4)),
        # KEDA: a field its schema does not have (minReplicas is the HPA's name)
        ("ScaledObject", lambda s: s["spec"].update(minReplicas=1)),
        # KEDA: a required field missing
        ("ScaledObject", lambda s: s["spec"].pop("scaleTargetRef")),
    ],
    ids=["misplaced", "misspelt", "wrong-type", "keda-type", "keda-unknown", "keda-required"],
)
def test_the_validation_catches_a_broken_object(
    k8s_objects: Objects, kind: str, mutate: Any
) -> None:
    broken = copy.deepcopy(_first_pool(k8s_objects, kind))
    mutate(broken)
    with pytest.raises((pytest.fail.Exception, AssertionError, ValueError)):
        validate(broken)
