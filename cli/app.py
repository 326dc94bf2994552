"""The ``spasemsr`` typer application and what every command shares: its console for
errors, logging set-up and the usage-error exit."""

from __future__ import annotations

import logging

import typer
from rich.console import Console

from cli.exit_codes import EPILOG, ExitCode

app = typer.Typer(
    help="SpaSemSR Serve: spatial-semantic guided diffusion super-resolution as a service.",
    epilog=EPILOG,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

SERVICE = "Service"
UPSCALING = "Upscaling parameters"

err = Console(stderr=True, soft_wrap=True)


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def fail(message: str, code: ExitCode) -> typer.Exit:
    err.print(f"error: {message}", markup=False, highlight=False)
    return typer.Exit(int(code))
