#!/usr/bin/env python3
"""Secrets for the deployments, generated on this machine (Python standard library only, so
it runs on a host where the project is not installed).

    python3 deploy/make_env.py compose [--env-file PATH] [--new-api-key]
        writes the values docker-compose.yml requires into the .env beside it (mode 0600):
        an API key's SHA-256, MinIO's root credentials and Grafana's admin password. Values
        already in the file are kept (MinIO and Grafana keep theirs in their volumes after
        their first start), and so are its other lines; --new-api-key replaces the API key.
        The key itself is printed once, never stored.

    python3 deploy/make_env.py key [--name NAME] [--admin]
        prints a new API key and its SPASEMSR_API__KEYS entry, for a Kubernetes secrets.env
        (deploy/kubernetes/overlays/production/) or any other deployment.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path

KEYS_VARIABLE = "SPASEMSR_API__KEYS"
# The names docker-compose.yml requires with ${NAME:?...}; tests/deploy checks they match.
COMPOSE_VARIABLES = (KEYS_VARIABLE, "S3_ACCESS_KEY", "S3_SECRET_KEY", "GRAFANA_ADMIN_PASSWORD")
KEY_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # core.settings.ApiKey.name
_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
# docker compose reads .env from the folder of docker-compose.yml, whatever the shell's folder.
COMPOSE_ENV_FILE = Path(__file__).resolve().parent.parent / ".env"


def new_key() -> str:
    """256 random bits, URL-safe: fits an Authorization header as it is."""
    return secrets.token_urlsafe(32)


def key_entry(name: str, key: str, *, admin: bool = False) -> dict[str, object]:
    """One element of SPASEMSR_API__KEYS: only the key's digest is configured."""
    entry: dict[str, object] = {"name": name, "sha256": hashlib.sha256(key.encode()).hexdigest()}
    if admin:
        entry["admin"] = True
    return entry


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as docker compose reads them (single quotes taken off the value)."""
    values: dict[str, str] = {}
    if not path.exists():
        return values
    for line in path.read_text().splitlines():
        match = _LINE.match(line.strip())
        if match:
            name, value = match.groups()
            if len(value) >= 2 and value[0] == value[-1] == "'":
                value = value[1:-1]
            values[name] = value
    return values


def _quoted(value: str) -> str:
    # Single quotes: compose takes the value literally (no $ interpolation, JSON kept whole).
    if "'" in value or "\n" in value:
        raise ValueError(f"cannot write {value!r} to an env file")
    return f"'{value}'"


def compose_changes(existing: dict[str, str], *, new_api_key: bool) -> tuple[dict[str, str], str]:
    """The compose variables to write: the missing ones generated, and the API key when asked.
    Returns them and the new API key ("" when the existing one is kept)."""
    changes: dict[str, str] = {}
    key = ""
    if new_api_key or not existing.get(KEYS_VARIABLE):
        key = new_key()
        changes[KEYS_VARIABLE] = json.dumps([key_entry("local", key)])
    generated = {
        "S3_ACCESS_KEY": f"spasemsr-{secrets.token_hex(4)}",
        "S3_SECRET_KEY": secrets.token_urlsafe(30),
        "GRAFANA_ADMIN_PASSWORD": secrets.token_urlsafe(18),
    }
    changes.update({name: value for name, value in generated.items() if not existing.get(name)})
    return changes, key


def updated_env_text(text: str, changes: dict[str, str]) -> str:
    """The file with ``changes`` written in: their lines replaced in place, new ones appended;
    every other line (the operator's own settings, comments) kept as it was."""
    remaining = dict(changes)
    lines = []
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if match and match.group(1) in remaining:
            name = match.group(1)
            lines.append(f"{name}={_quoted(remaining.pop(name))}")
        else:
            lines.append(line)
    if remaining:
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        lines.append(f"# Written by deploy/make_env.py ({stamp}); keep this file out of git.")
        lines += [f"{name}={_quoted(value)}" for name, value in remaining.items()]
    return "\n".join(lines) + "\n"


def write_private(path: Path, text: str) -> None:
    # Created private: the file holds MinIO's root password.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    path.chmod(0o600)


def compose(env_file: Path, *, new_api_key: bool) -> int:
    changes, key = compose_changes(read_env_file(env_file), new_api_key=new_api_key)
    if changes:
        text = env_file.read_text() if env_file.exists() else ""
        write_private(env_file, updated_env_text(text, changes))
        print(f"wrote {', '.join(changes)} to {env_file}")
    else:
        print(f"{env_file} already has {', '.join(COMPOSE_VARIABLES)}")
    if key:
        print("API key (shown once, stored only as its SHA-256; send it as")
        print("'Authorization: Bearer <key>' or 'X-API-Key: <key>'):")
        print(key)
    else:
        print("kept the existing API key (--new-api-key replaces it)")
    return 0


def key(name: str, *, admin: bool) -> int:
    if not KEY_NAME.match(name):
        print(f"--name must match {KEY_NAME.pattern}", file=sys.stderr)
        return 2
    value = new_key()
    print(f"API key (give it to the client; it is not stored anywhere): {value}")
    print("Its entry (add it to the JSON list of the deployment's keys):")
    print(f"{KEYS_VARIABLE}={json.dumps([key_entry(name, value, admin=admin)])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for_compose = commands.add_parser("compose", help="write the .env of docker-compose.yml")
    for_compose.add_argument("--env-file", type=Path, default=COMPOSE_ENV_FILE)
    for_compose.add_argument("--new-api-key", action="store_true")
    for_key = commands.add_parser("key", help="print a new API key and its entry")
    for_key.add_argument("--name", default="client")
    for_key.add_argument("--admin", action="store_true", help="may read and cancel every job")
    args = parser.parse_args(argv)
    if args.command == "compose":
        return compose(args.env_file, new_api_key=args.new_api_key)
    return key(args.name, admin=args.admin)


if __name__ == "__main__":
    sys.exit(main())
