"""The commands that talk to a running service through the Python client."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from spasemsr_client import RetryPolicy, SpaSemSRClient
from spasemsr_client._common import JobOptions
from spasemsr_client.errors import (
    ClientError,
    JobUnsuccessful,
    ProblemError,
    ServiceUnreachable,
    WaitTimeout,
)
from spasemsr_client.models import Job, JobStatus, ModelDescription, ModelList

from cli.display import Reporter, Tracked, describe, distinct_parts, job_warnings, model_text
from cli.exit_codes import ExitCode, exit_code_for

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
GLOB_CHARACTERS = frozenset("*?[")
STATUS_CODES = {
    JobStatus.SUCCEEDED: ExitCode.OK,
    JobStatus.FAILED: ExitCode.FAILED,
    JobStatus.CANCELED: ExitCode.CANCELED,
}


class InputError(Exception):
    """A command-line input that does not name any file."""


class ResultNotSaved(ClientError):
    """The job succeeded but its result could not be written (a read-only folder beside the
    input, a full disk): reported per file like any other error, never as a traceback."""


def connect(
    url: str, *, timeout: float, retries: int, api_key: str | None = None
) -> SpaSemSRClient:
    return SpaSemSRClient(url, timeout=timeout, retry=RetryPolicy(retries=retries), api_key=api_key)


@contextmanager
def exit_on_client_error(err: Console) -> Iterator[None]:
    """Turn a client error into its message on stderr and the documented exit code."""
    try:
        yield
    except ClientError as error:
        err.print(f"error: {error_text(error)}", markup=False, highlight=False)
        raise typer.Exit(exit_code_for(error)) from error


def error_text(error: ClientError) -> str:
    """A client error in words; a job that ended badly says how, each thing once."""
    if isinstance(error, JobUnsuccessful):
        return f"job {error.job.id} {describe(error.job)}"
    return str(error)


# --- inputs and outputs ------------------------------------------------------------------


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named by the arguments: paths, folders (their images) and globs (``*.png``)."""
    found: list[Path] = []
    for pattern in patterns:
        found += _expand_one(pattern)
    return list(dict.fromkeys(found))


def _expand_one(pattern: str) -> list[Path]:
    path = Path(pattern)
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise InputError(f"no PNG, JPEG or WebP image in folder {pattern}")
        return images
    if path.is_file():
        return [path]
    if GLOB_CHARACTERS & set(pattern):
        base, glob = _split_glob(pattern)
        matches = sorted(p for p in base.glob(glob) if p.is_file())
        if not matches:
            raise InputError(f"no file matches {pattern}")
        return matches
    raise InputError(f"no such file: {pattern}")


def _split_glob(pattern: str) -> tuple[Path, str]:
    """``photos/*.png`` -> (``photos``, ``*.png``); absolute patterns keep their root."""
    parts = Path(pattern).parts
    for index, part in enumerate(parts):
        if GLOB_CHARACTERS & set(part):
            return Path(*parts[:index]) if index else Path(), str(Path(*parts[index:]))
    return Path(), pattern


@dataclass(frozen=True)
class Saving:
    """Where ``submit`` saves results: as ``output`` exactly (one input), else as
    ``<stem>.x<scale>.<ext>`` in ``out_dir``, or beside each input when no folder is given."""

    out_dir: Path | None = None
    output: Path | None = None


def output_path_for(item: Tracked, job: Job, out_dir: Path | None, used: set[Path]) -> Path:
    """``<stem>.x<scale>.<ext>`` in ``out_dir`` (``None``: the input's own folder); a name
    already taken in this run gets the job id. The suffix keeps the input itself from ever
    being overwritten."""
    folder = item.source.parent if out_dir is None else out_dir
    extension = str(job.parameters.get("output_format", "png")).replace("jpeg", "jpg")
    scale = job.parameters.get("scale", "")
    path = folder / f"{item.source.stem}.x{scale}.{extension}"
    if path in used:
        path = folder / f"{item.source.stem}.{job.id[:8]}.x{scale}.{extension}"
    used.add(path)
    return path


# --- submit ------------------------------------------------------------------------------


def submit_all(
    client: SpaSemSRClient,
    items: list[Tracked],
    options: JobOptions,
    reporter: Reporter,
    *,
    model: str | None = None,
) -> None:
    """Upload every file; a refused file is recorded and the others still go."""
    for index, item in enumerate(items):
        try:
            item.job = client.submit(item.source, model=model, **options)
        except ServiceUnreachable as error:
            for rest in items[index:]:
                _record_error(rest, error, reporter)
            return
        except ClientError as error:
            _record_error(item, error, reporter)
            continue
        reporter.update(item)


FOLLOWED_AT_ONCE = 8
"""Event streams open at once; the other jobs are followed as these end."""


def follow(
    client: SpaSemSRClient,
    items: list[Tracked],
    reporter: Reporter,
    *,
    saving: Saving | None,
    timeout: float | None,
    poll_interval: float,
) -> None:
    """Follow every unfinished job through its event stream until all end; download each
    result as it arrives (``saving`` ``None``: nothing is downloaded).

    One thread per stream (at most ``FOLLOWED_AT_ONCE``) feeds a queue; this thread alone
    shows and saves, so the reporter is never drawn from two threads, and Ctrl-C reaches it
    at once (the streams' threads are daemons: a user who leaves is not kept waiting)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    updates: queue.Queue[tuple[Tracked, Job | ClientError]] = queue.Queue()
    slots = threading.BoundedSemaphore(FOLLOWED_AT_ONCE)
    for item in items:
        if not item.finished and item.job is not None:
            streams = _Stream(client, item, updates, slots, deadline, timeout, poll_interval)
            threading.Thread(target=streams.run, daemon=True).start()
    used: set[Path] = set()
    while any(not item.finished for item in items):
        if deadline is not None and time.monotonic() >= deadline:
            for item in items:
                if not item.finished and item.job is not None:
                    _record_error(item, WaitTimeout(item.job.id, timeout or 0.0), reporter)
            return
        try:
            item, update = updates.get(timeout=0.2)  # short: Ctrl-C and the deadline are seen
        except queue.Empty:
            continue
        if isinstance(update, ClientError):
            _record_error(item, update, reporter)
        else:
            _show(client, item, update, reporter, saving=saving, used=used)


@dataclass(frozen=True)
class _Stream:
    """Follows one job's events on its own thread, handing each state to ``updates``."""

    client: SpaSemSRClient
    item: Tracked
    updates: queue.Queue[tuple[Tracked, Job | ClientError]]
    slots: threading.BoundedSemaphore
    deadline: float | None
    timeout: float | None
    poll_interval: float

    def run(self) -> None:
        assert self.item.job is not None
        with self.slots:
            left = None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)
            try:
                for job in self.client.events(
                    self.item.job.id, timeout=left, poll_interval=self.poll_interval
                ):
                    self.updates.put((self.item, job))
            except WaitTimeout:
                return  # the main thread records it, for every job at the same moment
            except ClientError as error:
                self.updates.put((self.item, error))


def _show(
    client: SpaSemSRClient,
    item: Tracked,
    job: Job,
    reporter: Reporter,
    *,
    saving: Saving | None,
    used: set[Path],
) -> None:
    try:
        if job.status is JobStatus.SUCCEEDED and saving is not None:
            target = saving.output or output_path_for(item, job, saving.out_dir, used)
            item.output = _save(client, job.id, target)
    except ClientError as error:
        _record_error(item, error, reporter)
        return
    item.job = job
    item.code = STATUS_CODES.get(job.status, ExitCode.OK)
    reporter.update(item)


def _save(client: SpaSemSRClient, job_id: str, target: Path) -> Path:
    try:
        return client.download(job_id, target)
    except OSError as exc:
        raise ResultNotSaved(f"cannot save the result as {target}: {exc.strerror or exc}") from exc


def cancel_unfinished(client: SpaSemSRClient, items: list[Tracked], reporter: Reporter) -> None:
    """After Ctrl-C: nothing keeps running on the service for a user who left."""
    for item in items:
        if item.job is None or item.finished:
            continue
        try:
            item.job = client.cancel(item.job.id)
            reporter.note(f"{item.label}: job {item.job.id} cancel requested")
        except ClientError as error:
            reporter.note(f"{item.label}: could not cancel job {item.job.id}: {error}")
        item.code = ExitCode.INTERRUPTED


def _record_error(item: Tracked, error: ClientError, reporter: Reporter) -> None:
    item.error = error
    item.code = exit_code_for(error)
    reporter.update(item)


def overall_code(items: list[Tracked]) -> ExitCode:
    return max((item.code for item in items), default=ExitCode.OK)


def item_json(item: Tracked) -> dict[str, Any]:
    error: dict[str, Any] | None = None
    if item.error is not None:
        error = {"kind": type(item.error).__name__, "message": str(item.error)}
        if isinstance(item.error, ProblemError):
            error.update(item.error.problem.model_dump(mode="json"), status=item.error.status_code)
    return {
        "input": str(item.source),
        "job": item.job.model_dump(mode="json") if item.job else None,
        "output": str(item.output) if item.output else None,
        "error": error,
        "exit_code": int(item.code),
    }


def print_results(items: list[Tracked], *, as_json: bool, waited: bool) -> None:
    """stdout is for scripts: JSON lines, job ids (``--no-wait``), or ``IN -> OUT`` pairs."""
    for item in items:
        if as_json:
            typer.echo(json.dumps(item_json(item)))
        elif not waited and item.job is not None:
            typer.echo(item.job.id)
        elif item.output is not None:
            typer.echo(f"{item.source} -> {item.output}")


# --- status, cancel, model ----------------------------------------------------------------


def job_lines(job: Job) -> list[tuple[str, str]]:
    rows = [("job", job.id), ("status", describe(job)), ("model", model_text(job))]
    rows.append(("priority", job.priority))
    rows.append(("created", job.created_at.isoformat()))
    if job.started_at:
        rows.append(("started", job.started_at.isoformat()))
    if job.finished_at:
        rows.append(("finished", job.finished_at.isoformat()))
    parameters = ", ".join(f"{k}={v}" for k, v in job.parameters.items() if v not in (None, []))
    rows.append(("parameters", parameters))
    rows.append(("input", _image_text(job.input.width, job.input.height, job.input.format)))
    if job.output:
        rows.append(("output", _image_text(job.output.width, job.output.height, job.output.format)))
        rows.append(("result", job.links.result))
    if job.timings:
        rows.append(("timings", ", ".join(f"{k} {v:.3f} s" for k, v in job.timings.items())))
    if job.error:
        rows.append(("error", ": ".join(distinct_parts(job.error.title, job.error.detail))))
    rows += [("warning", warning) for warning in job_warnings(job)]
    return rows


def model_lines(model: ModelDescription) -> list[tuple[str, str]]:
    rows = [
        ("model", f"{model.name} {model.version} ({model.configuration})"),
        ("weights", model.weights),
        ("trained", "yes" if model.trained else "no (untrained weights)"),
        ("source", model.source or "-"),
        ("licence", model.licence or "-"),
        ("scales", scales_text(model)),
        ("device", f"{model.device} ({model.dtype})"),
        ("workers", str(model.workers)),
        ("default", "yes" if model.default else "no"),
    ]
    if model.description:
        rows.append(("description", model.description))
    return rows


MODEL_COLUMNS = ("name", "trained", "source", "licence", "scales", "device", "workers", "default")


def model_rows(catalogue: ModelList) -> list[tuple[str, ...]]:
    """One row per served model, in ``MODEL_COLUMNS`` order."""
    return [
        (
            model.name,
            "yes" if model.trained else "NO (untrained)",
            model.source or "-",
            model.licence or "-",
            scales_text(model),
            ", ".join(model.devices or [model.device]),
            str(model.workers),
            "yes" if model.default or model.name == catalogue.default else "",
        )
        for model in catalogue.models
    ]


def model_warnings(model: ModelDescription) -> list[str]:
    if model.warnings:
        return list(model.warnings)
    if not model.trained:
        return [
            f"The {model.name} weights are untrained: results show the pipeline working, "
            "not the model's quality."
        ]
    return []


def scales_text(model: ModelDescription) -> str:
    return ", ".join(f"x{scale}" for scale in model.scales)


def print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        typer.echo(f"{key.ljust(width)}  {value}")


def _image_text(width: int, height: int, fmt: str) -> str:
    return f"{width}x{height} {fmt}"
