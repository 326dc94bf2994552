"""The classical baseline: Lanczos resampling. Fast, deterministic, no weights."""

from __future__ import annotations

import time

from PIL import Image

from model.upscalers.base import ModelCard, ProgressCallback, UpscaleOptions, UpscaleResult


class LanczosUpscaler:
    """A real baseline that stays selectable by name (``lanczos``) beside SpaSemSR."""

    def __init__(self) -> None:
        self._card = ModelCard(
            name="lanczos",
            version="1",
            configuration="classical",
            weights="none",
            trained=True,  # nothing to train: never shown with an "untrained" warning
            device="cpu",
            dtype="uint8",
            description="Lanczos (sinc-windowed) resampling; the classical baseline.",
        )

    @property
    def card(self) -> ModelCard:
        return self._card

    def warm_up(self) -> None:
        self.upscale(Image.new("RGB", (8, 8)), UpscaleOptions(scale=2))

    def upscale(
        self,
        image: Image.Image,
        options: UpscaleOptions,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> UpscaleResult:
        if on_progress is not None:
            on_progress("upscale", 0, 1)
        started = time.perf_counter()
        size = (image.width * options.scale, image.height * options.scale)
        result = image.resize(size, Image.Resampling.LANCZOS)
        elapsed = time.perf_counter() - started
        if on_progress is not None:
            on_progress("upscale", 1, 1)
        return UpscaleResult(image=result, timings={"upscale": elapsed, "total": elapsed})
