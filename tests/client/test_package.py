"""The client is its own distribution, ``spasemsr-client``: it declares httpx and pydantic
and nothing else, and importing it loads no part of the service."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import requires, version
from pathlib import Path

from tests.conftest import ROOT

SERVICE_PACKAGES = {"app", "cli", "core", "model", "worker", "torch"}
# Each name a module a fresh interpreter holds once the client is imported, as JSON.
LOADED_AFTER_IMPORT = """
import json, sys
import spasemsr_client, spasemsr_client.aio, spasemsr_client.sync
print(json.dumps(sorted(sys.modules)))
"""


def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0].lower()


def test_the_distribution_depends_on_httpx_and_pydantic_only() -> None:
    declared = requires("spasemsr-client") or []
    assert sorted(_name(r) for r in declared) == ["httpx", "pydantic"], declared


def test_its_pins_and_version_are_the_services() -> None:
    service = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {_name(r): r for r in service["dependencies"]}
    declared = requires("spasemsr-client") or []
    assert sorted(declared) == sorted(pins[_name(r)] for r in declared)
    assert version("spasemsr-client") == service["version"]


def test_importing_it_loads_nothing_of_the_service() -> None:
    # cwd is a folder without the repository's packages in it, so that only what the client
    # itself imports can put them in sys.modules.
    completed = subprocess.run(
        [sys.executable, "-c", LOADED_AFTER_IMPORT],
        cwd=ROOT / "client",
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    loaded = json.loads(completed.stdout.strip().splitlines()[-1])
    top_level = {name.split(".")[0] for name in loaded}
    assert "spasemsr_client" in top_level  # the check sees what was imported
    assert not SERVICE_PACKAGES & top_level, sorted(SERVICE_PACKAGES & top_level)


def test_it_ships_its_type_information() -> None:
    import spasemsr_client

    # PEP 561: the marker beside the imported package (the package data of its pyproject).
    assert spasemsr_client.__file__ is not None
    assert Path(spasemsr_client.__file__).with_name("py.typed").is_file()
    config = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["spasemsr_client"]
