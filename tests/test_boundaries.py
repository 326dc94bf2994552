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
