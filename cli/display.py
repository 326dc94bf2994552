"""How the CLI shows jobs: live progress bars on a terminal, one line per change otherwise.

Every job shown names its model and whether the model's weights are trained; the warnings the
service attaches to a job (untrained weights, untrained grounding) go to stderr once each, as
``WARNING: ...`` lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from spasemsr_client.errors import ClientError
from spasemsr_client.models import Job, JobStatus

from cli.exit_codes import ExitCode


@dataclass
class Tracked:
    """One input file on its way through the service."""

    source: Path
    job: Job | None = None
    output: Path | None = None
    error: ClientError | None = None
    code: ExitCode = ExitCode.OK

    @property
    def label(self) -> str:
        return self.source.name

    @property
    def finished(self) -> bool:
        return self.error is not None or (self.job is not None and self.job.is_terminal)


def model_text(job: Job) -> str:
    """The job's model and whether it is trained, e.g. ``lanczos, trained``."""
    name = job.model or "service default"
    if job.model_trained is None:
        return f"{name}, trained: unknown"
    return f"{name}, {'trained' if job.model_trained else 'UNTRAINED'}"


def job_warnings(job: Job) -> list[str]:
    """What the user must be told about this job's result: the service's warnings, and one
    about untrained weights even when the service gave none."""
    warnings = list(job.warnings)
    if job.untrained and not any("untrained" in warning.lower() for warning in warnings):
        warnings.append(
            f"The {job.model or 'model'} weights are untrained: results show the pipeline "
            "working, not the model's quality."
        )
    return warnings


def warning_line(message: str) -> str:
    return f"WARNING: {message}"


def print_warning(console: Console, message: str) -> None:
    console.print(warning_line(message), style="bold yellow", markup=False, highlight=False)


def describe(job: Job) -> str:
    """A short human description of where a job stands."""
    status = job.status
    if status is JobStatus.QUEUED:
        position = job.queue_position
        if position is None:
            return "queued"
        return "queued (next)" if position == 0 else f"queued ({position} ahead)"
    if status is JobStatus.PROCESSING:
        progress = job.progress
        if progress.total > 0:
            return f"{progress.stage} {progress.step}/{progress.total}"
        return progress.stage
    if job.error is not None:
        return ": ".join(distinct_parts(status.value, job.error.title, job.error.detail))
    return status.value


def _gist(text: str) -> str:
    """What a part says, for comparison: ``Job canceled.`` says what ``canceled`` says."""
    return text.strip().lower().rstrip(".!").removeprefix("job ").strip()


def distinct_parts(*parts: str) -> list[str]:
    """The non-empty parts that say something the earlier ones did not, in order (a canceled
    job reads ``canceled``, not ``canceled: Job canceled: Job canceled``)."""
    kept: list[str] = []
    said: set[str] = set()
    for part in parts:
        gist = _gist(part)
        if gist and gist not in said:
            kept.append(part.strip())
            said.add(gist)
    return kept


class Reporter(Protocol):
    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...

    def update(self, item: Tracked) -> None:
        """Show the item's current state (called on every change)."""

    def note(self, message: str) -> None:
        """A one-off message (to the diagnostics stream)."""


class _Warnings:
    """Each distinct job warning once per run, however many jobs and updates carry it."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._seen: set[str] = set()

    def show(self, item: Tracked) -> None:
        if item.job is None:
            return
        for warning in job_warnings(item.job):
            if warning not in self._seen:
                self._seen.add(warning)
                print_warning(self._console, warning)


class LineReporter:
    """One line on stderr per change: readable in logs and CI, where nothing redraws."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._last: dict[int, str] = {}
        self._warnings = _Warnings(console)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    def update(self, item: Tracked) -> None:
        line = _line(item)
        if self._last.get(id(item)) != line:
            self._last[id(item)] = line
            self._console.print(f"{item.label}: {line}", markup=False, highlight=False)
        self._warnings.show(item)

    def note(self, message: str) -> None:
        self._console.print(message, markup=False, highlight=False)


class BarReporter:
    """Rich progress bars, one per file, redrawn in place on a terminal."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[state]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._tasks: dict[int, TaskID] = {}
        self._warnings = _Warnings(self._progress.console)

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def update(self, item: Tracked) -> None:
        task = self._tasks.get(id(item))
        if task is None:
            task = self._progress.add_task(item.label, total=None, state="")
            self._tasks[id(item)] = task
        completed, total = _bar(item)
        self._progress.update(task, completed=completed, total=total, state=_line(item))
        if item.finished:
            self._progress.stop_task(task)
        self._warnings.show(item)

    def note(self, message: str) -> None:
        self._progress.console.print(message, markup=False, highlight=False)


def _line(item: Tracked) -> str:
    if item.error is not None:
        return f"error: {item.error}"
    if item.job is None:
        return "uploading"
    text = f"job {item.job.id} [{model_text(item.job)}] {describe(item.job)}"
    if item.output is not None:
        text += f" -> {item.output}"
    return text


def _bar(item: Tracked) -> tuple[float, float | None]:
    job = item.job
    if job is None or item.error is not None:
        return 0.0, None
    if job.is_terminal:
        return 1.0, 1.0
    if job.progress.total > 0:
        return float(job.progress.step), float(job.progress.total)
    return 0.0, None


def make_reporter(console: Console, *, bars: bool | None = None) -> Reporter:
    """Bars on an interactive terminal (or when asked), lines otherwise."""
    use_bars = console.is_terminal if bars is None else bars
    return BarReporter(console) if use_bars else LineReporter(console)
