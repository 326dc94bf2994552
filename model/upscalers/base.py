"""The upscaler interface that the worker runs, and the types that cross it.

Every upscaler (the classical Lanczos baseline, the SpaSemSR diffusion pipeline) takes an RGB
``PIL.Image`` and returns one exactly ``scale`` times larger, reporting progress through a
callback. A callback may raise to abort the run (the worker uses this for cancellation); the
upscaler must let that exception propagate unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from PIL import Image

from model.pipeline.prompt import GroundedPrompt

ColorFix = Literal["none", "adain", "wavelet"]
SchedulerName = Literal["ddpm", "ddim", "dpmsolver++", "unipc"]

ProgressCallback = Callable[[str, int, int], None]
"""``(stage, step, total)``; called at least once per stage and once per denoising step."""


@dataclass(frozen=True, kw_only=True)
class UpscaleOptions:
    """What one request asks of an upscaler. Bounds are enforced by the caller's contract."""

    scale: int = 4
    steps: int = 20
    guidance_scale: float = 4.5
    seed: int | None = None
    color_fix: ColorFix = "wavelet"
    scheduler: SchedulerName = "dpmsolver++"
    tile_size: int = 512
    """Side of one diffusion tile, in output pixels."""
    negative_prompt: str | None = None
    prompt: GroundedPrompt | None = None
    """An explicit grounded prompt; ``None`` lets the upscaler ground the image itself."""
    tags_hint: tuple[str, ...] = ()
    caption_hint: str | None = None


@dataclass(frozen=True, kw_only=True)
class UpscaleResult:
    image: Image.Image
    timings: Mapping[str, float] = field(default_factory=dict)
    """Seconds per stage, e.g. ``grounding``, ``encode``, ``denoise``, ``decode``."""
    details: Mapping[str, Any] = field(default_factory=dict)
    """JSON-serialisable facts about the run shown to users (e.g. the grounded prompt used)."""


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    """What a user is told about the model that serves them."""

    name: str
    version: str
    configuration: str
    weights: str
    trained: bool
    device: str
    dtype: str
    description: str = ""
    source: str = ""
    """Where the weights come from (a package, a paper's release, a training run)."""
    licence: str = ""
    """The weights' licence (SPDX id where there is one)."""
    scales: tuple[int, ...] = (2, 4)
    """Magnifications this model serves."""


@runtime_checkable
class Upscaler(Protocol):
    @property
    def card(self) -> ModelCard: ...

    def warm_up(self) -> None:
        """Run once before the first job so that its latency is paid at start-up."""

    def upscale(
        self,
        image: Image.Image,
        options: UpscaleOptions,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> UpscaleResult: ...
