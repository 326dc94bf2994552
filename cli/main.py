"""The ``spasemsr`` command (typer).

Runs the service's processes (``serve``, ``api``, ``worker``), talks to a running service
through the Python client (``submit``, ``status``, ``cancel``, ``models``, ``model``, ``bench``,
``demo``) and runs any model locally without a service (``upscale``).

Every job shown names its model and whether the model is trained; untrained weights get a
``WARNING:`` line on stderr.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
from pathlib import Path
from typing import Annotated, Literal

import typer
from pydantic import ValidationError
from rich.console import Console

from cli.exit_codes import EPILOG, ExitCode
from client import DEFAULT_URL
from client._common import JobOptions
from client.errors import ClientError
from client.models import JobStatus
from core.jobs import (
    ColorFix,
    ImageFormat,
    Priority,
    ScaleFactor,
    SchedulerName,
    parameter_bounds,
    parameter_default,
)
from core.models import ModelName
from core.settings import Settings

app = typer.Typer(
    help="SpaSemSR Serve: spatial-semantic guided diffusion super-resolution as a service.",
    epilog=EPILOG,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

SERVICE = "Service"
UPSCALING = "Upscaling parameters"

_err = Console(stderr=True, soft_wrap=True)


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _fail(message: str, code: ExitCode) -> typer.Exit:
    _err.print(f"error: {message}", markup=False, highlight=False)
    return typer.Exit(int(code))


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
_STEPS, _GUIDANCE = parameter_bounds("steps"), parameter_bounds("guidance_scale")
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
        min=int(_STEPS.minimum),
        max=int(_STEPS.maximum),
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


def _job_options(
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


def _check_parameters(options: dict[str, object]) -> None:
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
        raise _fail(f"--{where.replace('_', '-')}: {first.get('msg')}", ExitCode.USAGE) from exc


# --- running the service -----------------------------------------------------------------


@app.command(rich_help_panel="Run the service")
def serve(
    port: Annotated[int | None, typer.Option(help="API port (default 8000).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    verbose: Verbose = False,
) -> None:
    """Run everything on this machine: embedded Redis (unless configured), API and workers."""
    from cli.serve import serve as run_all

    _logging(verbose)
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

    _logging(verbose)
    run_worker(Settings(), burst=burst)


# --- using a running service -------------------------------------------------------------


@app.command(rich_help_panel="Use a running service")
def submit(
    inputs: Annotated[
        list[str],
        typer.Argument(
            metavar="IN...", help="Image files, folders (their images) or globs ('*.png')."
        ),
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "--out-dir",
            "-d",
            show_default=False,
            help="Folder for the results, named like photo.x4.png (default: beside each input).",
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Exact result path (one input only).")
    ] = None,
    model: ModelOpt = None,
    scale: Scale = None,
    steps: Steps = None,
    guidance_scale: Guidance = None,
    seed: Seed = None,
    color_fix: ColorFixOpt = None,
    scheduler: SchedulerOpt = None,
    tile_size: TileSize = None,
    tags: Tags = None,
    caption: Caption = None,
    output_format: Annotated[
        ImageFormat | None,
        typer.Option(
            "--format",
            help=f"Result format (default {parameter_default('output_format')}).",
            rich_help_panel=UPSCALING,
        ),
    ] = None,
    priority: Annotated[
        Priority | None,
        typer.Option(help="Queue priority (default: default).", rich_help_panel=UPSCALING),
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="Wait for the results (--no-wait prints job ids and returns).")
    ] = True,
    download: Annotated[bool, typer.Option(help="Download the results.")] = True,
    wait_timeout: Annotated[
        float | None,
        typer.Option("--wait-timeout", min=0.1, help="Give up waiting after this many seconds."),
    ] = None,
    bars: Annotated[
        bool | None,
        typer.Option(
            "--bars/--lines", help="Progress bars or plain lines (default: bars on a terminal)."
        ),
    ] = None,
    as_json: AsJson = False,
    url: Url = DEFAULT_URL,
    timeout: Timeout = 30.0,
    retries: Retries = 3,
    api_key: ApiKey = None,
) -> None:
    """Send images to a running service, show queue position and progress, save the results.

    Ctrl-C cancels the jobs that have not finished yet.
    """
    from cli import remote
    from cli.display import Tracked, make_reporter

    # Ctrl-C cancels what is unfinished, however this was started: a shell script's
    # background job inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        sources = remote.expand_inputs(inputs)
    except remote.InputError as exc:
        raise _fail(str(exc), ExitCode.USAGE) from exc
    if output is not None and len(sources) != 1:
        raise _fail("--output takes exactly one input; use --out for several", ExitCode.USAGE)
    given = _job_options(
        scale=scale, steps=steps, guidance_scale=guidance_scale, seed=seed, color_fix=color_fix,
        scheduler=scheduler, tile_size=tile_size, tags=tags, caption=caption,
    )  # fmt: skip
    _check_parameters(given)
    options: JobOptions = {**given, **_present(output_format=output_format, priority=priority)}  # type: ignore[typeddict-item]
    if wait and download:
        _make_folder(output.parent if output is not None else out_dir)
    items = [Tracked(source) for source in sources]
    with remote.connect(url, timeout=timeout, retries=retries, api_key=api_key) as client:
        with make_reporter(_err, bars=bars) as reporter:
            try:
                remote.submit_all(client, items, options, reporter, model=_name(model))
                if wait:
                    remote.follow(
                        client, items, reporter,
                        saving=remote.Saving(out_dir=out_dir, output=output) if download else None,
                        timeout=wait_timeout, poll_interval=0.25,
                    )  # fmt: skip
            except KeyboardInterrupt:
                remote.cancel_unfinished(client, items, reporter)
        remote.print_results(items, as_json=as_json, waited=wait)
    raise typer.Exit(int(remote.overall_code(items)))


def _make_folder(folder: Path | None) -> None:
    """The results' folder, made before anything is submitted: a folder that cannot exist
    is a usage error, not jobs whose results have nowhere to go."""
    if folder is None:  # beside each input: those folders exist
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        message = f"cannot create the folder {folder}: {exc.strerror or exc}"
        raise _fail(message, ExitCode.USAGE) from exc


def _present(**values: object) -> dict[str, object]:
    return {key: value for key, value in values.items() if value is not None}


def _name(model: ModelName | None) -> str | None:
    return None if model is None else model.value


@app.command(rich_help_panel="Use a running service")
def status(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="Job id.")],
    wait: Annotated[
        bool, typer.Option(help="Wait until the job ends; the exit code tells how it ended.")
    ] = False,
    as_json: AsJson = False,
    url: Url = DEFAULT_URL,
    timeout: Timeout = 30.0,
    retries: Retries = 3,
    api_key: ApiKey = None,
) -> None:
    """Show a job: status, queue position, progress, timings, sizes, error."""
    from cli import remote
    from cli.display import describe, job_warnings, print_warning

    with (
        remote.exit_on_client_error(_err),
        remote.connect(url, timeout=timeout, retries=retries, api_key=api_key) as client,
    ):
        if wait:
            job = client.wait(
                job_id,
                raise_on_failure=False,
                on_progress=lambda j: _err.print(describe(j), markup=False, highlight=False),
            )
        else:
            job = client.get(job_id)
    if as_json:
        typer.echo(job.model_dump_json(indent=2))
    else:
        remote.print_rows(remote.job_lines(job))
    for warning in job_warnings(job):
        print_warning(_err, warning)
    if wait:
        raise typer.Exit(int(remote.STATUS_CODES.get(job.status, ExitCode.OK)))


@app.command(rich_help_panel="Use a running service")
def cancel(
    job_ids: Annotated[list[str], typer.Argument(metavar="JOB...", help="Job ids.")],
    url: Url = DEFAULT_URL,
    timeout: Timeout = 30.0,
    retries: Retries = 3,
    api_key: ApiKey = None,
) -> None:
    """Cancel jobs: a queued one at once, a running one at its next step."""
    from cli import remote
    from cli.exit_codes import exit_code_for

    codes = [ExitCode.OK]
    with remote.connect(url, timeout=timeout, retries=retries, api_key=api_key) as client:
        for job_id in job_ids:
            try:
                job = client.cancel(job_id)
            except ClientError as error:
                _err.print(f"{job_id}: error: {error}", markup=False, highlight=False)
                codes.append(exit_code_for(error))
                continue
            if job.status is JobStatus.CANCELED:
                typer.echo(f"{job_id}: canceled")
            else:
                typer.echo(
                    f"{job_id}: cancel requested ({job.status.value}; stops at its next step)"
                )
    raise typer.Exit(int(max(codes)))


@app.command(rich_help_panel="Use a running service")
def model(
    as_json: AsJson = False,
    url: Url = DEFAULT_URL,
    timeout: Timeout = 30.0,
    retries: Retries = 3,
    api_key: ApiKey = None,
) -> None:
    """The default model: name, configuration, weights, trained or not, source, device."""
    from cli import remote
    from cli.display import print_warning

    with (
        remote.exit_on_client_error(_err),
        remote.connect(url, timeout=timeout, retries=retries, api_key=api_key) as client,
    ):
        described = client.model()
    if as_json:
        typer.echo(described.model_dump_json(indent=2))
    else:
        remote.print_rows(remote.model_lines(described))
    for warning in remote.model_warnings(described):
        print_warning(_err, warning)


@app.command(rich_help_panel="Use a running service")
def models(
    as_json: AsJson = False,
    url: Url = DEFAULT_URL,
    timeout: Timeout = 30.0,
    retries: Retries = 3,
    api_key: ApiKey = None,
) -> None:
    """Every model the service serves: trained or not, source, licence, scales, device."""
    from rich import box
    from rich.table import Table

    from cli import remote
    from cli.display import print_warning

    with (
        remote.exit_on_client_error(_err),
        remote.connect(url, timeout=timeout, retries=retries, api_key=api_key) as client,
    ):
        catalogue = client.models()
    if as_json:
        typer.echo(catalogue.model_dump_json(indent=2))
    elif catalogue.models:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for column in remote.MODEL_COLUMNS:
            table.add_column(column, no_wrap=column in {"name", "trained", "scales"})
        for row in remote.model_rows(catalogue):
            table.add_row(*row)
        out = Console(soft_wrap=False, width=None if Console().is_terminal else 200)
        out.print(table, markup=False, highlight=False)
    for described in catalogue.models:
        for warning in remote.model_warnings(described):
            print_warning(_err, warning)
    if catalogue.get(catalogue.default) is None:
        _err.print(
            f"note: no warm worker serves the default model {catalogue.default} yet "
            "(its jobs wait for one)",
            markup=False,
            highlight=False,
        )
    if not catalogue.models:
        raise _fail("no warm worker is serving a model yet", ExitCode.UNAVAILABLE)


@app.command(rich_help_panel="Use a running service")
def bench(
    jobs: Annotated[int, typer.Option(min=1, help="Jobs to run.")] = 50,
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs in flight at once.")] = 4,
    image: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="Input image (default: a generated one)."),
    ] = None,
    model: ModelOpt = None,
    scale: Annotated[
        ScaleFactor, typer.Option(help="Upscaling factor.", rich_help_panel=UPSCALING)
    ] = 2,
    steps: Steps = None,
    as_json: AsJson = False,
    url: Url = DEFAULT_URL,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds allowed per job.", rich_help_panel=SERVICE)
    ] = 300.0,
    api_key: ApiKey = None,
) -> None:
    """Load a running service with jobs; print latency percentiles and throughput."""
    from cli.bench import run_bench

    data = image.read_bytes() if image is not None else _sample_png()
    options: JobOptions = _present(scale=scale, steps=steps)  # type: ignore[assignment]
    try:
        report = asyncio.run(
            run_bench(
                url,
                data,
                jobs=jobs,
                concurrency=concurrency,
                options=options,
                timeout=timeout,
                api_key=api_key,
                model=_name(model),
            )
        )
    except ClientError as error:
        from cli.exit_codes import exit_code_for

        raise _fail(str(error), exit_code_for(error)) from error
    if as_json:
        typer.echo(json.dumps(report.as_json(), indent=2))
    else:
        _print_bench(report.as_json())
    if report.outcomes.get("succeeded", 0) != jobs:
        raise _fail(f"not every job succeeded: {report.outcomes}", ExitCode.FAILED)


def _print_bench(figures: dict[str, object]) -> None:
    from rich.table import Table

    table = Table(title=f"{figures['jobs']} jobs, concurrency {figures['concurrency']}")
    table.add_column("seconds")
    for column in ("p50", "p95", "p99", "mean", "max"):
        table.add_column(column, justify="right")
    seconds = figures["seconds"]
    assert isinstance(seconds, dict)
    for name, values in seconds.items():
        table.add_row(name, *(f"{values[c]:.4f}" for c in ("p50", "p95", "p99", "mean", "max")))
    Console().print(table)
    typer.echo(
        f"wall {figures['wall_seconds']} s, throughput {figures['throughput_jobs_per_second']} "
        f"jobs/s, outcomes {figures['outcomes']}"
    )


def _sample_png() -> bytes:
    from cli.sample import sample_image

    buffer = io.BytesIO()
    sample_image().save(buffer, format="PNG")
    return buffer.getvalue()


@app.command(rich_help_panel="Use a running service")
def demo(
    url: Url = DEFAULT_URL,
    out: Annotated[Path, typer.Option(help="Where to save the result.")] = Path(
        "var/demo-result.png"
    ),
    model: ModelOpt = None,
    scale: Annotated[ScaleFactor, typer.Option(help="Upscaling factor.")] = 4,
    steps: Annotated[
        int,
        typer.Option(min=int(_STEPS.minimum), max=int(_STEPS.maximum), help="Denoising steps."),
    ] = 4,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the result.")] = 300.0,
    api_key: ApiKey = None,
) -> None:
    """Submit a generated sample image to a running service, wait, save the result; say which
    model ran and whether it is trained."""
    from cli import remote
    from cli.display import describe, job_warnings, model_text

    data = _sample_png()
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / "demo-input.png").write_bytes(data)
    with (
        remote.exit_on_client_error(_err),
        remote.connect(url, timeout=30, retries=3, api_key=api_key) as client,
    ):
        job = client.submit(
            data, model=_name(model), filename="sample.png", scale=scale, steps=steps, seed=0
        )
        typer.echo(f"job {job.id} queued for model {model_text(job)}")
        warned = _warn_new(job_warnings(job), set())
        job = client.wait(
            job.id, timeout=timeout, on_progress=lambda j: typer.echo(f"{describe(j)}")
        )
        client.download(job.id, out)
    assert job.output is not None
    typer.echo(f"model: {model_text(job)}")
    typer.echo(f"saved {out} ({job.output.width}x{job.output.height}); timings: {job.timings}")
    _warn_new(job_warnings(job), warned)


def _warn_new(warnings: list[str], already: set[str]) -> set[str]:
    """Print the warnings not printed yet; every warning printed so far."""
    from cli.display import print_warning

    for warning in warnings:
        if warning not in already:
            print_warning(_err, warning)
    return already | set(warnings)


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
    given = _job_options(
        scale=scale, steps=steps, guidance_scale=guidance_scale, seed=seed, color_fix=color_fix,
        scheduler=scheduler, tile_size=tile_size, tags=tags, caption=caption,
    )  # fmt: skip
    _check_parameters(given)
    if isinstance(given.get("tags"), str):
        given["tags"] = tuple(str(given["tags"]).split(","))
    parameters = JobParameters.model_validate(given)
    try:
        output_format_for(target)
    except LocalInputError as exc:
        raise _fail(str(exc), ExitCode.USAGE) from exc
    settings = offline_settings()
    if model_path is not None:
        settings.model.path = model_path
    if device is not None:
        settings.model.device = device
    name = model or default_model(settings)
    progress = StageProgress(_err, bars=_err.is_terminal if bars is None else bars)
    try:
        run = upscale_file(settings, name, source, target, parameters, progress)
    except LocalInputError as exc:
        raise _fail(str(exc), ExitCode.REJECTED) from exc
    except Exception as exc:  # a model that cannot load or run: say so, no traceback
        logging.getLogger(__name__).debug("upscaling failed", exc_info=True)
        raise _fail(f"upscaling failed: {type(exc).__name__}: {exc}", ExitCode.FAILED) from exc
    card = run.card
    timings = ", ".join(f"{k} {v:.3f} s" for k, v in run.result.timings.items())
    trained = "trained" if card.trained else "UNTRAINED"
    typer.echo(
        f"saved {target} ({run.size[0]}x{run.size[1]}) with {card.name} {card.version} "
        f"({trained}); {timings}"
    )
    if not card.trained:
        print_warning(
            _err,
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

    _logging(verbose)
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
            raise _fail(str(exc), ExitCode.USAGE) from exc
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
        raise _fail(f"cannot assemble the pipeline: {exc}", ExitCode.USAGE) from exc
    typer.echo(f"pipeline written to {path}")


@app.command(rich_help_panel="Without a service")
def train(
    data: Annotated[
        Path,
        typer.Argument(
            metavar="DATA", exists=True, file_okay=False, help="Data set folder (HR images in hr/)."
        ),
    ],
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
    max_steps: Annotated[int, typer.Option(min=1, help="Optimiser steps.")] = 200_000,
    batch_size: Annotated[int, typer.Option(min=1, help="Patches per device and step.")] = 32,
    accumulation: Annotated[int, typer.Option(min=1, help="Gradient accumulation steps.")] = 1,
    learning_rate: Annotated[float, typer.Option(min=0.0, help="AdamW learning rate.")] = 5e-5,
    warmup_steps: Annotated[int, typer.Option(min=0, help="Linear warm-up steps.")] = 500,
    resolution: Annotated[int, typer.Option(min=8, help="HR patch side in pixels.")] = 512,
    null_prompt_ratio: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Empty-prompt probability (CFG).")
    ] = 0.5,
    lambda_image: Annotated[float, typer.Option(min=0.0, help="Weight of L1(ImageEnc, VAE).")] = (
        0.05
    ),
    lambda_semantic: Annotated[
        float, typer.Option(min=0.0, help="Weight of L1(SemanticEnc, SAM).")
    ] = 0.05,
    lambda_controlnet: Annotated[
        float, typer.Option(min=0.0, help="Weight of the ControlNet regulariser (0: off).")
    ] = 0.05,
    mixed_precision: Annotated[
        Literal["no", "fp16", "bf16"], typer.Option(help="Mixed precision.")
    ] = "no",
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Recompute activations to save memory.")
    ] = False,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Steps between checkpoints.")] = (
        1000
    ),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    num_workers: Annotated[int, typer.Option(min=0, help="Data loader workers.")] = 0,
    verbose: Verbose = False,
) -> None:
    """Train SpaSemSR's blocks on HR images (accelerate: `accelerate launch -m cli.main train`)."""
    from model.training import TrainingConfig
    from model.training import train as run_training

    _logging(verbose)
    try:
        config = TrainingConfig(
            max_steps=max_steps,
            batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            learning_rate=learning_rate,
            warmup_steps=warmup_steps,
            resolution=resolution,
            null_prompt_ratio=null_prompt_ratio,
            lambda_image=lambda_image,
            lambda_semantic=lambda_semantic,
            lambda_controlnet=lambda_controlnet,
            mixed_precision=mixed_precision,
            gradient_checkpointing=gradient_checkpointing,
            checkpoint_every=checkpoint_every,
            seed=seed,
            num_workers=num_workers,
        )
    except ValueError as exc:
        raise _fail(str(exc), ExitCode.USAGE) from exc
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
        )
    except ValueError as exc:
        raise _fail(str(exc), ExitCode.USAGE) from exc
    last = report.losses[-1]["total"] if report.losses else float("nan")
    typer.echo(
        f"trained steps {report.first_step}..{report.global_step} "
        f"({report.steps_per_second:.3f} steps/s, last loss {last:.4f}); "
        f"pipeline at {report.pipeline_dir}"
    )


if __name__ == "__main__":
    app()
