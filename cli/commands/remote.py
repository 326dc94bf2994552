"""Commands that use a running service through the Python client: ``submit``, ``status``,
``cancel``, ``model``, ``models``, ``bench``, ``demo``."""

from __future__ import annotations

import asyncio
import io
import json
import signal
from pathlib import Path
from typing import Annotated, cast

import typer
from rich.console import Console
from spasemsr_client import DEFAULT_URL
from spasemsr_client._common import JobOptions
from spasemsr_client.errors import ClientError
from spasemsr_client.models import JobStatus

from cli.app import SERVICE, UPSCALING, app, err, fail
from cli.exit_codes import ExitCode
from cli.options import (
    STEPS_BOUNDS,
    ApiKey,
    AsJson,
    Caption,
    ColorFixOpt,
    Guidance,
    ModelOpt,
    Retries,
    Scale,
    SchedulerOpt,
    Seed,
    Steps,
    Tags,
    TileSize,
    Timeout,
    Url,
    check_parameters,
    job_options,
)
from core.jobs import (
    ImageFormat,
    Priority,
    ScaleFactor,
    parameter_default,
)
from core.models import ModelName

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
    webhook: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="URL the service POSTs each job to (HMAC-signed) when it ends; the API's "
            "webhook_url field.",
        ),
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
        raise fail(str(exc), ExitCode.USAGE) from exc
    if output is not None and len(sources) != 1:
        raise fail("--output takes exactly one input; use --out for several", ExitCode.USAGE)
    given = job_options(
        scale=scale, steps=steps, guidance_scale=guidance_scale, seed=seed, color_fix=color_fix,
        scheduler=scheduler, tile_size=tile_size, tags=tags, caption=caption,
    )  # fmt: skip
    check_parameters(given)
    chosen = _present(output_format=output_format, priority=priority, webhook=webhook)
    options = cast("JobOptions", {**given, **chosen})  # checked by check_parameters and the API
    if wait and download:
        _make_folder(output.parent if output is not None else out_dir)
    items = [Tracked(source) for source in sources]
    with remote.connect(url, timeout=timeout, retries=retries, api_key=api_key) as client:
        with make_reporter(err, bars=bars) as reporter:
            try:
                remote.submit_all(client, items, options, reporter, model=_name(model))
                if wait:  # each job's event stream; polled only where a service has none
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
        raise fail(message, ExitCode.USAGE) from exc


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
        remote.exit_on_client_error(err),
        remote.connect(url, timeout=timeout, retries=retries, api_key=api_key) as client,
    ):
        if wait:
            job = client.wait(
                job_id,
                raise_on_failure=False,
                on_progress=lambda j: err.print(describe(j), markup=False, highlight=False),
            )
        else:
            job = client.get(job_id)
    if as_json:
        typer.echo(job.model_dump_json(indent=2))
    else:
        remote.print_rows(remote.job_lines(job))
    for warning in job_warnings(job):
        print_warning(err, warning)
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
                err.print(f"{job_id}: error: {error}", markup=False, highlight=False)
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
        remote.exit_on_client_error(err),
        remote.connect(url, timeout=timeout, retries=retries, api_key=api_key) as client,
    ):
        described = client.model()
    if as_json:
        typer.echo(described.model_dump_json(indent=2))
    else:
        remote.print_rows(remote.model_lines(described))
    for warning in remote.model_warnings(described):
        print_warning(err, warning)


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
        remote.exit_on_client_error(err),
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
            print_warning(err, warning)
    if catalogue.get(catalogue.default) is None:
        err.print(
            f"note: no warm worker serves the default model {catalogue.default} yet "
            "(its jobs wait for one)",
            markup=False,
            highlight=False,
        )
    if not catalogue.models:
        raise fail("no warm worker is serving a model yet", ExitCode.UNAVAILABLE)


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

        raise fail(str(error), exit_code_for(error)) from error
    if as_json:
        typer.echo(json.dumps(report.as_json(), indent=2))
    else:
        _print_bench(report.as_json())
    if report.outcomes.get("succeeded", 0) != jobs:
        raise fail(f"not every job succeeded: {report.outcomes}", ExitCode.FAILED)


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
        typer.Option(
            min=int(STEPS_BOUNDS.minimum), max=int(STEPS_BOUNDS.maximum), help="Denoising steps."
        ),
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
        remote.exit_on_client_error(err),
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
            print_warning(err, warning)
    return already | set(warnings)
