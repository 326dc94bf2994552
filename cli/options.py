"""Options that several commands share, declared once: where the service is, how to talk to
it, and the job parameters (their bounds, defaults and choices from the job contract)."""

from __future__ import annotations

from typing import Annotated

import typer
from pydantic import ValidationError

from cli.app import SERVICE, UPSCALING, fail
from cli.exit_codes import ExitCode
from core.jobs import (
    ColorFix,
    ScaleFactor,
    SchedulerName,
    parameter_bounds,
    parameter_default,
)
from core.models import ModelName

# --- options shared by several commands --------------------------------------------------

Url = Annotated[
    str,
    typer.Option(
        "--url", envvar="SPASEMSR_URL", help="Base URL of the service.", rich_help_panel=SERVICE
    ),
]
Timeout = Annotated[
    float,
    typer.Option(min=0.1, help="Seconds allowed for each HTTP request.", rich_help_panel=SERVICE),
]
Retries = Annotated[
    int,
    typer.Option(
        min=0,
        help="Retries of 429/503 answers (honouring Retry-After).",
        rich_help_panel=SERVICE,
    ),
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        envvar="SPASEMSR_API_KEY",
        help="API key, when the service requires one.",
        show_default=False,
        rich_help_panel=SERVICE,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]

# Bounds, defaults and choices of the job parameters come from the job contract (core.jobs).
STEPS_BOUNDS = parameter_bounds("steps")
_GUIDANCE = parameter_bounds("guidance_scale")
_SEED, _TILE = parameter_bounds("seed"), parameter_bounds("tile_size")

Scale = Annotated[
    ScaleFactor | None,
    typer.Option(
        help=f"Upscaling factor (default {parameter_default('scale')}).",
        rich_help_panel=UPSCALING,
    ),
]
Steps = Annotated[
    int | None,
    typer.Option(
        min=int(STEPS_BOUNDS.minimum),
        max=int(STEPS_BOUNDS.maximum),
        help=f"Denoising steps (default {parameter_default('steps')}).",
        rich_help_panel=UPSCALING,
    ),
]
Guidance = Annotated[
    float | None,
    typer.Option(
        min=_GUIDANCE.minimum,
        max=_GUIDANCE.maximum,
        help=f"Classifier-free guidance (default {parameter_default('guidance_scale')}).",
        rich_help_panel=UPSCALING,
    ),
]
Seed = Annotated[
    int | None,
    typer.Option(
        min=int(_SEED.minimum),
        max=int(_SEED.maximum),
        help="Random seed (default: random).",
        rich_help_panel=UPSCALING,
    ),
]
ColorFixOpt = Annotated[
    ColorFix | None,
    typer.Option(
        "--color-fix",
        help=f"Colour correction (default {parameter_default('color_fix')}).",
        rich_help_panel=UPSCALING,
    ),
]
SchedulerOpt = Annotated[
    SchedulerName | None,
    typer.Option(
        help=f"Diffusion scheduler (default {parameter_default('scheduler')}).",
        rich_help_panel=UPSCALING,
    ),
]
TileSize = Annotated[
    int | None,
    typer.Option(
        min=int(_TILE.minimum),
        max=int(_TILE.maximum),
        help=f"Diffusion tile side in output pixels, a multiple of {int(_TILE.multiple_of or 1)} "
        f"(default {parameter_default('tile_size')}).",
        rich_help_panel=UPSCALING,
    ),
]
Tags = Annotated[
    str | None,
    typer.Option(help="Grounding hint: comma-separated object tags.", rich_help_panel=UPSCALING),
]
Caption = Annotated[
    str | None, typer.Option(help="Grounding hint: a caption.", rich_help_panel=UPSCALING)
]
ModelOpt = Annotated[
    ModelName | None,
    typer.Option(
        "--model",
        "-m",
        case_sensitive=False,
        show_default=False,
        help="Which model (default: the service's default; `spasemsr models` lists them).",
        rich_help_panel=UPSCALING,
    ),
]


def job_options(
    *,
    scale: int | None,
    steps: int | None,
    guidance_scale: float | None,
    seed: int | None,
    color_fix: str | None,
    scheduler: str | None,
    tile_size: int | None,
    tags: str | None,
    caption: str | None,
) -> dict[str, object]:
    """The parameters given on the command line (the rest take the defaults)."""
    given = {
        "scale": scale,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "color_fix": color_fix,
        "scheduler": scheduler,
        "tile_size": tile_size,
        "tags": tags,
        "caption": caption,
    }
    return {key: value for key, value in given.items() if value is not None}


def check_parameters(options: dict[str, object]) -> None:
    """Bounds the command line cannot express (tile size multiple of 64, tag lengths)."""
    from core.jobs import JobParameters

    values = dict(options)
    if isinstance(values.get("tags"), str):
        values["tags"] = tuple(str(values["tags"]).split(","))
    try:
        JobParameters.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        raise fail(f"--{where.replace('_', '-')}: {first.get('msg')}", ExitCode.USAGE) from exc
