"""Commands that need no service: ``upscale``, ``eval``, ``weights``, ``train``."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer

from cli.app import app, configure_logging, err, fail
from cli.exit_codes import ExitCode
from cli.options import (
    Caption,
    ColorFixOpt,
    Guidance,
    Scale,
    SchedulerOpt,
    Seed,
    Steps,
    Tags,
    TileSize,
    Verbose,
    check_parameters,
    job_options,
)
from core.models import ModelName
from model.training.config import TrainingConfig

# --- without a service -------------------------------------------------------------------


@app.command(rich_help_panel="Without a service")
def upscale(
    source: Annotated[
        Path,
        typer.Argument(
            metavar="IN", exists=True, dir_okay=False, readable=True, help="Input image."
        ),
    ],
    target: Annotated[
        Path, typer.Argument(metavar="OUT", help="Output image (.png, .jpg or .webp).")
    ],
    model: Annotated[
        ModelName | None,
        typer.Option(
            "--model",
            "-m",
            case_sensitive=False,
            show_default=False,
            help="Which model (default: $SPASEMSR_MODEL__DEFAULT; else spasemsr with "
            "--model-path, else realesrgan-x4plus).",
        ),
    ] = None,
    model_path: Annotated[
        Path | None,
        typer.Option(help="SpaSemSR pipeline folder (default: the tiny demo pipeline)."),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1... (default: auto).")
    ] = None,
    scale: Scale = None,
    steps: Steps = None,
    guidance_scale: Guidance = None,
    seed: Seed = None,
    color_fix: ColorFixOpt = None,
    scheduler: SchedulerOpt = None,
    tile_size: TileSize = None,
    tags: Tags = None,
    caption: Caption = None,
    bars: Annotated[
        bool | None,
        typer.Option(
            "--bars/--lines", help="Progress bars or plain lines (default: bars on a terminal)."
        ),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Upscale one image on this machine with any model, as a worker runs it; no service.

    Converted weights and the demo pipeline are kept in $SPASEMSR_VAR_DIR/models,
    else in ~/.cache/spasemsr/models ($XDG_CACHE_HOME), never in the current folder.
    """
    from cli.display import print_warning
    from cli.local import (
        LocalInputError,
        StageProgress,
        offline_settings,
        output_format_for,
        upscale_file,
    )
    from core.jobs import JobParameters
    from core.models import default_model

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING)
    given = job_options(
        scale=scale, steps=steps, guidance_scale=guidance_scale, seed=seed, color_fix=color_fix,
        scheduler=scheduler, tile_size=tile_size, tags=tags, caption=caption,
    )  # fmt: skip
    check_parameters(given)
    if isinstance(given.get("tags"), str):
        given["tags"] = tuple(str(given["tags"]).split(","))
    parameters = JobParameters.model_validate(given)
    try:
        output_format_for(target)
    except LocalInputError as exc:
        raise fail(str(exc), ExitCode.USAGE) from exc
    settings = offline_settings()
    if model_path is not None:
        settings.model.path = model_path
    if device is not None:
        settings.model.device = device
    name = model or default_model(settings)
    progress = StageProgress(err, bars=err.is_terminal if bars is None else bars)
    try:
        run = upscale_file(settings, name, source, target, parameters, progress)
    except LocalInputError as exc:
        raise fail(str(exc), ExitCode.REJECTED) from exc
    except Exception as exc:  # a model that cannot load or run: say so, no traceback
        logging.getLogger(__name__).debug("upscaling failed", exc_info=True)
        raise fail(f"upscaling failed: {type(exc).__name__}: {exc}", ExitCode.FAILED) from exc
    card = run.card
    timings = ", ".join(f"{k} {v:.3f} s" for k, v in run.result.timings.items())
    trained = "trained" if card.trained else "UNTRAINED"
    typer.echo(
        f"saved {target} ({run.size[0]}x{run.size[1]}) with {card.name} {card.version} "
        f"({trained}); {timings}"
    )
    if not card.trained:
        print_warning(
            err,
            f"The {card.name} weights are untrained ({card.weights}): the result shows the "
            "pipeline working, not the model's quality.",
        )


@app.command(name="eval", rich_help_panel="Without a service")
def eval_command(
    datasets: Annotated[
        list[Path] | None,
        typer.Argument(
            metavar="[DATASET]...",
            exists=True,
            file_okay=False,
            show_default=False,
            help="Folders laid out like RealSR, DRealSR, DIV2K-val (gt/ + lq/) or RealLR200; "
            "none: the photographs bundled with scikit-image, degraded here.",
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Where the tables go.")] = Path("var/eval"),
    spasemsr: Annotated[
        bool, typer.Option(help="Evaluate SpaSemSR too (else only the baselines).")
    ] = True,
    steps: Annotated[int, typer.Option(min=1, max=100, help="Denoising steps.")] = 20,
    seed: Annotated[int, typer.Option(help="Random seed (degradation and sampling).")] = 0,
    max_images: Annotated[int | None, typer.Option(min=1, help="Images per set.")] = None,
    photos: Annotated[
        list[str] | None,
        typer.Option(
            "--photo", show_default=False, help="Bundled photo to use (repeat; default: six)."
        ),
    ] = None,
    crop: Annotated[
        int, typer.Option(min=32, max=1024, help="HR crop side of each bundled photo.")
    ] = 256,
    clip_model: Annotated[Path | None, typer.Option(help="Local CLIP folder for CLIP-IQA.")] = None,
    lpips_backbone: Annotated[Path | None, typer.Option(help="LPIPS trunk weights.")] = None,
    lpips_linear: Annotated[Path | None, typer.Option(help="LPIPS linear weights.")] = None,
    verbose: Verbose = False,
) -> None:
    """PSNR/SSIM (Y) of bicubic, Lanczos, Real-ESRGAN x4plus and SpaSemSR, with the paper's
    numbers beside them: on test-set folders, or on bundled photographs with a figure.

    Models are kept as for `spasemsr upscale` ($SPASEMSR_VAR_DIR, else ~/.cache/spasemsr).
    """
    from cli.local import offline_settings
    from cli.offline import evaluate_bundled_photos, evaluate_folders

    configure_logging(verbose)
    settings = offline_settings()
    if datasets:
        report = evaluate_folders(
            datasets,
            out_dir=out,
            settings=settings,
            include_spasemsr=spasemsr,
            steps=steps,
            seed=seed,
            max_images=max_images,
            clip_model=clip_model,
            lpips_backbone=lpips_backbone,
            lpips_linear=lpips_linear,
        )
    else:
        try:
            report = evaluate_bundled_photos(
                out_dir=out,
                settings=settings,
                include_spasemsr=spasemsr,
                steps=steps,
                seed=seed,
                crop=crop,
                photos=photos,
            )
        except (KeyError, ValueError) as exc:
            raise fail(str(exc), ExitCode.USAGE) from exc
    typer.echo(report.markdown)
    written = [report.markdown_path, report.csv_path, report.figure_path]
    typer.echo("written: " + ", ".join(str(path) for path in written if path is not None))


@app.command(rich_help_panel="Without a service")
def weights(
    output: Annotated[Path, typer.Argument(metavar="OUT", help="Pipeline folder to write.")],
    base: Annotated[
        str, typer.Option(help="SD-2 diffusers folder (or hub id where the network allows).")
    ],
    sam: Annotated[
        str | None, typer.Option(help="transformers SAM ViT-B folder (or hub id).")
    ] = None,
    blocks: Annotated[
        Path | None,
        typer.Option(help="Trained SpaSemSR blocks (a training output); omit for untrained."),
    ] = None,
    configuration: Annotated[
        str, typer.Option(help="Configuration name recorded in the folder.")
    ] = "sd2",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder.")] = False,
) -> None:
    """Assemble a full-size SpaSemSR pipeline folder for SPASEMSR_MODEL__PATH."""
    from cli.offline import assemble_weights

    try:
        path = assemble_weights(
            output,
            base=base,
            sam=sam,
            blocks=blocks,
            configuration=configuration,
            overwrite=overwrite,
        )
    except (OSError, ValueError) as exc:
        raise fail(f"cannot assemble the pipeline: {exc}", ExitCode.USAGE) from exc
    typer.echo(f"pipeline written to {path}")


def _training_parameters() -> list[inspect.Parameter]:
    """One option per field of ``TrainingConfig`` that declares its help (its type, default,
    bounds and help from the field), so the command and the config cannot drift apart."""
    hints = get_type_hints(TrainingConfig)
    parameters = []
    for spec in dataclasses.fields(TrainingConfig):
        if "help" not in spec.metadata:
            continue
        names = [spec.metadata["flag"]] if "flag" in spec.metadata else []
        option = typer.Option(
            *names,
            help=spec.metadata["help"],
            min=spec.metadata.get("min"),
            max=spec.metadata.get("max"),
            rich_help_panel="Training",
        )
        parameters.append(
            inspect.Parameter(
                spec.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=spec.default,
                annotation=Annotated[hints[spec.name], option],
            )
        )
    return parameters


_RUN_PARAMETERS = {"data", "out", "pipeline", "grounder", "resume", "sam", "verbose"}


def train(
    data: Annotated[
        Path,
        typer.Argument(
            metavar="DATA", exists=True, file_okay=False, help="Data set folder (HR images in hr/)."
        ),
    ],
    *,
    out: Annotated[
        Path, typer.Option(help="Run folder: checkpoints, prompt cache, pipeline/.")
    ] = Path("var/train"),
    pipeline: Annotated[
        Path | None,
        typer.Option(help="Base pipeline folder to train from (default: the tiny configuration)."),
    ] = None,
    grounder: Annotated[
        Path | None,
        typer.Option(help="Grounder folder for tags/boxes/captions (default: generic prompts)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the latest checkpoint in --out.")
    ] = False,
    sam: Annotated[
        Path | None,
        typer.Option(
            help="Frozen SAM folder, the semantic constraint's target (default: the pipeline's "
            "sam_target/, or its semantic encoder while untrained)."
        ),
    ] = None,
    verbose: Verbose = False,
    **hyper_parameters: Any,
) -> None:
    """Train SpaSemSR's blocks on HR images (accelerate: `accelerate launch -m cli.main train`)."""
    from model.training.trainer import train as run_training

    configure_logging(verbose)
    try:
        config = TrainingConfig(**hyper_parameters)
    except ValueError as exc:
        raise fail(str(exc), ExitCode.USAGE) from exc
    loaded_grounder = None
    if grounder is not None:
        from model.grounding import SpaSemSRGrounder

        loaded_grounder = SpaSemSRGrounder.from_pretrained(grounder)
    try:
        report = run_training(
            config,
            data_dir=data,
            output_dir=out,
            pipeline_dir=pipeline,
            resume=resume,
            grounder=loaded_grounder,
            sam_dir=sam,
        )
    except ValueError as exc:
        raise fail(str(exc), ExitCode.USAGE) from exc
    last = report.losses[-1]["total"] if report.losses else float("nan")
    typer.echo(
        f"trained steps {report.first_step}..{report.global_step} "
        f"({report.steps_per_second:.3f} steps/s, last loss {last:.4f}); "
        f"pipeline at {report.pipeline_dir}"
    )


def _register_train() -> None:
    own = inspect.signature(train, eval_str=True).parameters
    fixed = [p for name, p in own.items() if name in _RUN_PARAMETERS]
    signature = inspect.Signature([*fixed, *_training_parameters()])
    train.__signature__ = signature  # type: ignore[attr-defined]
    train.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    app.command(name="train", rich_help_panel="Without a service")(train)


_register_train()
