"""core/secrets_check.py: the API and the worker refuse to start with an API key anyone knows.

Unit tests of the check, then the real entry points (``python -m app.server``, ``python -m
worker``) started with a placeholder key: each exits 1 before it opens a port or a Redis
connection, and says which key and why.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.main import create_app
from core.secrets_check import (
    PLACEHOLDER_KEYS,
    RefusedToStart,
    placeholder_api_keys,
    refuse_placeholder_api_keys,
    refuse_unusable_api_keys,
)
from core.settings import ApiKey, ApiSettings, Settings
from tests.conftest import ROOT
from tests.deploy.conftest import TEST_API_KEY


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _api(*keys: tuple[str, str], auth_required: bool = True) -> ApiSettings:
    return ApiSettings(
        auth_required=auth_required,
        keys=tuple(ApiKey(name=name, sha256=_digest(key)) for name, key in keys),
    )


@pytest.mark.parametrize(
    "placeholder", ["change-me", "changeme", "secret", "password", "example", ""]
)
def test_the_named_placeholders_are_refused(placeholder: str) -> None:
    api = _api(("svc-a", placeholder))
    assert placeholder_api_keys(api) == {"svc-a": placeholder}
    with pytest.raises(RefusedToStart) as refused:
        refuse_placeholder_api_keys(api)
    message = str(refused.value)
    assert message.startswith("refusing to start: SPASEMSR_API__KEYS")
    assert "'svc-a'" in message and repr(placeholder) in message
    assert "deploy/make_env.py key" in message  # how to do it right
    assert refused.value.code == message  # SystemExit: printed, exit status 1


@pytest.mark.parametrize("spelling", ["Change-me", "CHANGE-ME", "change-me\n", "SECRET\n"])
def test_common_spellings_are_refused(spelling: str) -> None:
    """Capitalised, in capitals, and hashed with echo's newline (`echo x | sha256sum`)."""
    assert placeholder_api_keys(_api(("svc-a", spelling))) == {"svc-a": spelling}


def test_every_listed_placeholder_is_refused() -> None:
    api = _api(*((f"k{i}", word) for i, word in enumerate(PLACEHOLDER_KEYS)))
    assert len(placeholder_api_keys(api)) == len(PLACEHOLDER_KEYS)


def test_only_the_placeholder_keys_are_named() -> None:
    api = _api(("good", TEST_API_KEY), ("bad", "change-me"))
    assert placeholder_api_keys(api) == {"bad": "change-me"}
    with pytest.raises(RefusedToStart, match="'bad'") as refused:
        refuse_placeholder_api_keys(api)
    assert "'good'" not in str(refused.value)


def test_real_keys_pass() -> None:
    api = _api(("svc-a", TEST_API_KEY), ("svc-b", "a-long-random-value-of-the-operator"))
    refuse_placeholder_api_keys(api)
    refuse_unusable_api_keys(api)


def test_the_api_refuses_to_require_keys_it_does_not_have() -> None:
    with pytest.raises(RefusedToStart, match="SPASEMSR_API__KEYS is empty"):
        refuse_unusable_api_keys(_api())
    refuse_unusable_api_keys(_api(auth_required=False))  # open on purpose (make run)
    refuse_placeholder_api_keys(_api())  # the worker does not authenticate anyone


def test_create_app_refuses_before_building_anything() -> None:
    settings = Settings()
    settings.api.keys = (ApiKey(name="svc-a", sha256=_digest("change-me")),)
    with pytest.raises(RefusedToStart):
        create_app(settings)


def _start(module: str, keys: str, tmp_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **tmp_env,
        "SPASEMSR_API__AUTH_REQUIRED": "true",
        "SPASEMSR_API__KEYS": keys,
        # Nothing listens there: a process that got past the check would wait or fail later.
        "SPASEMSR_REDIS__URL": "redis://127.0.0.1:9/0",
    }
    return subprocess.run(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("module", ["app.server", "worker"])
def test_the_entry_points_exit_1_with_the_reason(module: str, tmp_path: Path) -> None:
    keys = f'[{{"name": "svc-a", "sha256": "{_digest("change-me")}"}}]'
    done = _start(module, keys, {"SPASEMSR_VAR_DIR": str(tmp_path)})
    assert done.returncode == 1, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("refusing to start: SPASEMSR_API__KEYS holds a placeholder key")
    assert "Traceback" not in done.stderr


def test_the_api_exits_1_when_keys_are_required_and_none_is_set(tmp_path: Path) -> None:
    done = _start("app.server", "[]", {"SPASEMSR_VAR_DIR": str(tmp_path)})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "SPASEMSR_API__KEYS is empty" in done.stderr
