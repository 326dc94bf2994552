"""The ``spasemsr`` command (typer).

Runs the service's processes (``serve``, ``api``, ``worker``: ``cli.commands.processes``),
talks to a running service through the Python client (``submit``, ``status``, ``cancel``,
``models``, ``model``, ``bench``, ``demo``: ``cli.commands.remote``) and works without a
service (``upscale``, ``eval``, ``weights``, ``train``: ``cli.commands.offline``).

Every job shown names its model and whether the model is trained; untrained weights get a
``WARNING:`` line on stderr.
"""

from __future__ import annotations

import importlib

from cli.app import app

# Importing a command module registers its commands, in this order in ``--help``.
for _module in ("processes", "remote", "offline"):
    importlib.import_module(f"cli.commands.{_module}")

__all__ = ["app"]

if __name__ == "__main__":
    app()
