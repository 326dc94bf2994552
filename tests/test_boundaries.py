"""Package boundaries of DESIGN 3.1, checked in fresh interpreters."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

_IMPORT_ALL = """
import importlib, json, pkgutil, sys
for package in {packages!r}:
    module = importlib.import_module(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        if info.name.rsplit(".", 1)[-1] != "__main__":
            importlib.import_module(info.name)
print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}})))
"""


def _top_level_modules_after_importing(*packages: str) -> set[str]:
    completed = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL.format(packages=list(packages))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return set(json.loads(completed.stdout.strip().splitlines()[-1]))


def test_api_side_never_imports_torch() -> None:
    loaded = _top_level_modules_after_importing("app", "core")
    assert "torch" not in loaded
    assert not {"diffusers", "transformers", "model", "worker"} & loaded


def test_model_knows_nothing_of_the_service() -> None:
    loaded = _top_level_modules_after_importing("model")
    assert not {"core", "app", "worker", "cli", "redis", "rq", "fastapi", "starlette"} & loaded


_IMPORT_ONLY = """
import importlib, json, sys
for name in {modules!r}:
    importlib.import_module(name)
print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}})))
"""


def _top_level_modules_after(*modules: str) -> set[str]:
    completed = subprocess.run(
        [sys.executable, "-c", _IMPORT_ONLY.format(modules=list(modules))],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    return set(json.loads(completed.stdout.strip().splitlines()[-1]))


def test_the_client_needs_only_httpx_and_pydantic() -> None:
    # Its own distribution (client/pyproject.toml); tests/client/test_package.py checks what
    # that distribution declares.
    loaded = _top_level_modules_after_importing("spasemsr_client")
    first_party = {"app", "cli", "core", "model", "worker"}
    assert not first_party & loaded
    assert not {"torch", "redis", "rq", "fastapi", "boto3"} & loaded


_IMPORT_WALKED = """
import importlib, json, pkgutil, sys
for name in {modules!r}:
    module = importlib.import_module(name)
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), name + "."):
        if info.name.rsplit(".", 1)[-1] != "__main__":
            importlib.import_module(info.name)
print(json.dumps(sorted(sys.modules)))
"""


def _modules_after_walking(*modules: str) -> set[str]:
    """Every module loaded (full names) after importing ``modules`` and, for packages, all of
    their submodules, in a fresh interpreter."""
    completed = subprocess.run(
        [sys.executable, "-c", _IMPORT_WALKED.format(modules=list(modules))],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    return set(json.loads(completed.stdout.strip().splitlines()[-1]))


def _within(loaded: set[str], *packages: str) -> set[str]:
    return {name for name in loaded if any(name == p or name.startswith(p + ".") for p in packages)}


def test_the_worker_never_imports_the_api() -> None:
    loaded = _top_level_modules_after("worker.main", "worker.tasks", "worker.healthcheck")
    assert not {"app", "fastapi", "starlette", "uvicorn"} & loaded
    # Nor does any other module of the package.
    everything = {name.split(".")[0] for name in _modules_after_walking("worker")}
    assert not {"app", "fastapi", "starlette", "uvicorn"} & everything


def test_the_command_line_loads_torch_only_in_commands_that_run_a_model() -> None:
    # The whole CLI (every command registered) starts without torch: remote commands talk
    # HTTP only, and offline ones import the model code when they run (only the torch-free
    # training config is read up front, for train's options).
    loaded = _top_level_modules_after("cli.main", "cli.commands.remote", "cli.commands.processes")
    assert not {"torch", "diffusers", "transformers"} & loaded

    # The remote commands, once more in full: no model code beyond that config, and no torch.
    remote = _modules_after_walking("cli.commands.remote", "cli.remote")
    assert not _within(remote, "torch", "diffusers", "transformers")
    assert _within(remote, "model") <= {"model", "model.training", "model.training.config"}


def test_serving_code_imports_no_training_or_evaluation() -> None:
    # Every module of the serving packages, and the worker's job path, in one interpreter.
    loaded = _modules_after_walking(
        "model.blocks", "model.pipeline", "model.upscalers", "worker.engine", "worker.tasks"
    )
    assert not _within(loaded, "model.training", "model.evaluation")
