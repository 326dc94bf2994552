"""Commands that run the service's own processes: ``serve`` (everything on one machine),
``api``, ``worker``."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.app import app, configure_logging
from cli.options import (
    Verbose,
)
from core.settings import Settings

# --- running the service -----------------------------------------------------------------


@app.command(rich_help_panel="Run the service")
def serve(
    port: Annotated[int | None, typer.Option(help="API port (default 8000).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    verbose: Verbose = False,
) -> None:
    """Run everything on this machine: embedded Redis (unless configured), API and workers."""
    from cli.serve import serve as run_all

    configure_logging(verbose)
    settings = Settings()
    if port is not None:
        settings.api.port = port
    raise typer.Exit(run_all(settings, workers=workers))


@app.command(rich_help_panel="Run the service")
def api(
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
) -> None:
    """Run only the HTTP API (needs SPASEMSR_REDIS__URL)."""
    from app.server import run_api

    run_api(Settings(), host=host, port=port, log_level="info")


@app.command(rich_help_panel="Run the service")
def worker(
    burst: Annotated[bool, typer.Option(help="Exit when the queues are empty.")] = False,
    verbose: Verbose = False,
) -> None:
    """Run one worker process: load the model once, keep it warm, take jobs."""
    from worker.main import run_worker

    configure_logging(verbose)
    run_worker(Settings(), burst=burst)
