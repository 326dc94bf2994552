"""The ``spasemsr`` command (typer)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from core.settings import Settings

app = typer.Typer(
    help="SpaSemSR Serve: spatial-semantic guided diffusion super-resolution as a service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

EXIT_FAILED = 1
EXIT_UNAVAILABLE = 3


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def serve(
    port: Annotated[int | None, typer.Option(help="API port (default 8000).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run everything on this machine: embedded Redis (unless configured), API and workers."""
    from cli.serve import serve as run_all

    _logging(verbose)
    settings = Settings()
    if port is not None:
        settings.api.port = port
    raise typer.Exit(run_all(settings, workers=workers))


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
) -> None:
    """Run only the HTTP API (needs SPASEMSR_REDIS__URL)."""
    import uvicorn

    from app.main import create_app

    settings = Settings()
    uvicorn.run(
        create_app(settings),
        host=host or settings.api.host,
        port=port or settings.api.port,
        log_level="info",
    )


@app.command()
def worker(
    burst: Annotated[bool, typer.Option(help="Exit when the queues are empty.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run one worker process: load the model once, keep it warm, take jobs."""
    from worker.main import run_worker

    _logging(verbose)
    run_worker(Settings(), burst=burst)


@app.command()
def demo(
    url: Annotated[str, typer.Option(help="Base URL of a running service.")] = (
        "http://127.0.0.1:8000"
    ),
    out: Annotated[Path, typer.Option(help="Where to save the result.")] = Path(
        "var/demo-result.png"
    ),
    scale: Annotated[int, typer.Option(help="2 or 4.")] = 4,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 4,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the result.")] = 300.0,
) -> None:
    """Submit a generated sample image to a running service, wait, save the result."""
    import io

    from cli.sample import sample_image

    buffer = io.BytesIO()
    sample_image().save(buffer, format="PNG")
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / "demo-input.png").write_bytes(buffer.getvalue())
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            created = client.post(
                "/v1/jobs",
                files={"image": ("sample.png", buffer.getvalue(), "image/png")},
                data={"scale": str(scale), "steps": str(steps), "seed": "0"},
            )
            if created.status_code != 202:
                typer.echo(f"refused: {created.status_code} {created.text}", err=True)
                raise typer.Exit(EXIT_FAILED)
            job = created.json()
            typer.echo(f"job {job['id']} queued")
            job = _wait_for(client, job["id"], timeout)
            if job["status"] != "succeeded":
                typer.echo(f"job {job['status']}: {job.get('error')}", err=True)
                raise typer.Exit(EXIT_FAILED)
            result = client.get(f"/v1/jobs/{job['id']}/result", follow_redirects=True)
            result.raise_for_status()
            out.write_bytes(result.content)
    except httpx.TransportError as exc:
        typer.echo(f"cannot reach {url}: {exc}", err=True)
        raise typer.Exit(EXIT_UNAVAILABLE) from exc
    typer.echo(
        f"saved {out} ({job['output']['width']}x{job['output']['height']}); "
        f"timings: {job['timings']}"
    )


def _wait_for(client: httpx.Client, job_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        progress = job.get("progress") or {}
        line = f"{job['status']} {progress}"
        if line != last:
            typer.echo(line)
            last = line
        if job["status"] in {"succeeded", "failed", "canceled"}:
            return job
        time.sleep(0.2)
    typer.echo(f"gave up after {timeout} s", err=True)
    sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    app()
