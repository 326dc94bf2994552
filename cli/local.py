"""``spasemsr upscale IN OUT --model NAME``: any model run locally, without the service.

The upscaler is built exactly as a worker builds it (``worker.engine.load_upscaler(settings,
name)``) and the
image goes through the same decode / pad / finish / encode steps (``worker.imaging``), so a
local result matches what the service would return for the same parameters.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from core.jobs import ImageFormat, JobParameters
from core.models import ModelName
from core.settings import Settings

if TYPE_CHECKING:
    from model.upscalers.base import ModelCard, UpscaleResult

logger = logging.getLogger(__name__)

FORMAT_BY_SUFFIX = {
    ".png": ImageFormat.PNG,
    ".jpg": ImageFormat.JPEG,
    ".jpeg": ImageFormat.JPEG,
    ".webp": ImageFormat.WEBP,
}


CACHE_FOLDER = "spasemsr"


def user_data_dir() -> Path:
    """The per-user data directory of the commands that run models on this machine:
    ``$XDG_CACHE_HOME/spasemsr``, else ``~/.cache/spasemsr``. Everything in it (converted
    Real-ESRGAN weights, the tiny demo pipeline) is rebuilt when missing."""
    cache_home = os.environ.get("XDG_CACHE_HOME", "").strip()
    # XDG: a relative value is invalid and must be ignored.
    base = Path(cache_home) if cache_home and Path(cache_home).is_absolute() else None
    return (base or Path.home() / ".cache") / CACHE_FOLDER


def offline_settings() -> Settings:
    """The settings of ``upscale`` and ``eval``: ``SPASEMSR_VAR_DIR`` when it is set, else the
    per-user data directory, so that running a model never leaves a ``var/`` folder in whatever
    folder the command was started from. (``serve``, ``api`` and ``worker`` keep the service's
    own default, ``var/``.)"""
    settings = Settings()
    if "var_dir" not in settings.model_fields_set:
        settings.var_dir = user_data_dir()
    return settings


class LocalInputError(Exception):
    """The input cannot be read as an image, or the output suffix names no supported format."""


def output_format_for(path: Path) -> ImageFormat:
    try:
        return FORMAT_BY_SUFFIX[path.suffix.lower()]
    except KeyError:
        raise LocalInputError(
            f"cannot tell the output format from {path.name!r}: use .png, .jpg or .webp"
        ) from None


class StageProgress:
    """Progress of a local run: a bar on a terminal, a line per stage and step otherwise."""

    def __init__(self, console: Console, *, bars: bool) -> None:
        self._console = console
        self._bars = bars
        self._progress = Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._tasks: dict[str, TaskID] = {}
        self._last: tuple[str, int, int] | None = None

    def __enter__(self) -> Self:
        if self._bars:
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._bars:
            self._progress.stop()

    def __call__(self, stage: str, step: int, total: int) -> None:
        if (stage, step, total) == self._last:
            return
        self._last = (stage, step, total)
        if not self._bars:
            self._console.print(f"{stage} {step}/{total}", markup=False, highlight=False)
            return
        task = self._tasks.get(stage)
        if task is None:
            task = self._progress.add_task(stage, total=max(total, 1))
            self._tasks[stage] = task
        self._progress.update(task, completed=step, total=max(total, 1))


@dataclass(frozen=True)
class LocalRun:
    size: tuple[int, int]
    """The output image's width and height."""
    result: UpscaleResult
    card: ModelCard
    """The model that ran (name, version, trained or not)."""


def upscale_file(
    settings: Settings,
    model: ModelName,
    source: Path,
    target: Path,
    parameters: JobParameters,
    progress: StageProgress,
) -> LocalRun:
    """Upscale ``source`` into ``target`` with ``model``; the output size, the upscaler's result
    and the model's card."""
    from model.upscalers.base import UpscaleOptions
    from worker import imaging
    from worker.engine import load_upscaler

    output_format = output_format_for(target)
    try:
        decoded = imaging.decode(source.read_bytes())
    except (OSError, ValueError) as exc:
        raise LocalInputError(f"cannot read {source}: not an image that can be decoded") from exc
    started = time.perf_counter()
    upscaler = load_upscaler(settings, model)
    logger.info("loaded %s in %.1f s", upscaler.card.name, time.perf_counter() - started)
    padded, original_size = imaging.pad_to_minimum(decoded.rgb)
    options = UpscaleOptions(
        scale=parameters.scale,
        steps=parameters.steps,
        guidance_scale=parameters.guidance_scale,
        seed=parameters.seed,
        color_fix=parameters.color_fix,
        scheduler=parameters.scheduler,
        tile_size=parameters.tile_size,
        tags_hint=parameters.tags,
        caption_hint=parameters.caption,
    )
    with progress:
        result = upscaler.upscale(padded, options, on_progress=progress)
    image = imaging.finish(
        result.image,
        decoded,
        original_size=original_size,
        scale=parameters.scale,
        output_format=output_format,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(imaging.encode(image, output_format))
    return LocalRun(size=image.size, result=result, card=upscaler.card)
