"""deploy/make_env.py: the first-run secrets of the compose stack and new API keys."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import stat
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

from core.secrets_check import placeholder_api_keys
from core.settings import ApiSettings
from tests.deploy.conftest import DEPLOY

SCRIPT = DEPLOY / "make_env.py"


@cache
def make_env_module() -> ModuleType:
    """The script as a module (it is a file to run on a host, not part of a package)."""
    spec = importlib.util.spec_from_file_location("deploy_make_env", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    # A bare interpreter, as on a host without the project: standard library only (-I).
    return subprocess.run(
        [sys.executable, "-I", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _printed_key(stdout: str) -> str:
    return stdout.strip().splitlines()[-1]


def _keys(value: str) -> ApiSettings:
    return ApiSettings.model_validate({"keys": json.loads(value)})


def test_compose_writes_a_private_env_file_and_prints_the_key_once(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    done = _run("compose", "--env-file", str(env_file))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    values = make_env_module().read_env_file(env_file)
    assert set(values) == set(make_env_module().COMPOSE_VARIABLES)
    key = _printed_key(done.stdout)
    assert key not in env_file.read_text()  # only its digest is stored
    api = _keys(values["SPASEMSR_API__KEYS"])
    assert api.keys[0].sha256 == hashlib.sha256(key.encode()).hexdigest()
    assert placeholder_api_keys(api) == {}
    assert len(key) >= 40  # 256 random bits


def test_compose_keeps_existing_values_and_the_operators_lines(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("# my settings\nAPI_BIND_ADDRESS=0.0.0.0\n")
    assert _run("compose", "--env-file", str(env_file)).returncode == 0
    first = make_env_module().read_env_file(env_file)
    again = _run("compose", "--env-file", str(env_file))
    assert again.returncode == 0 and "kept the existing API key" in again.stdout
    assert make_env_module().read_env_file(env_file) == first
    rotated = _run("compose", "--env-file", str(env_file), "--new-api-key")
    after = make_env_module().read_env_file(env_file)
    assert after["SPASEMSR_API__KEYS"] != first["SPASEMSR_API__KEYS"]
    # MinIO and Grafana keep their first credentials in their volumes: never replaced.
    assert {k: v for k, v in after.items() if k != "SPASEMSR_API__KEYS"} == {
        k: v for k, v in first.items() if k != "SPASEMSR_API__KEYS"
    }
    assert (
        _keys(after["SPASEMSR_API__KEYS"]).keys[0].sha256
        == hashlib.sha256(_printed_key(rotated.stdout).encode()).hexdigest()
    )
    assert env_file.read_text().startswith("# my settings\nAPI_BIND_ADDRESS=0.0.0.0\n")


def test_key_prints_a_key_and_its_entry() -> None:
    done = _run("key", "--name", "svc-a", "--admin")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    key = lines[0].rsplit(" ", 1)[-1]
    name, _, value = lines[-1].partition("=")
    assert name == "SPASEMSR_API__KEYS"
    (entry,) = _keys(value).keys
    assert (entry.name, entry.admin) == ("svc-a", True)
    assert entry.sha256 == hashlib.sha256(key.encode()).hexdigest()


def test_key_refuses_a_name_the_settings_would_refuse() -> None:
    done = _run("key", "--name", "no spaces")
    assert done.returncode == 2 and "--name" in done.stderr


@pytest.mark.parametrize("value", ["it's", "two\nlines"])
def test_values_that_an_env_file_cannot_hold_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="env file"):
        make_env_module().updated_env_text("", {"S3_SECRET_KEY": value})
