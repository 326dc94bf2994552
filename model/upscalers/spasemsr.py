"""The SpaSemSR upscaler: the worker's default model, on the :class:`model.upscalers.base.Upscaler`
protocol.

Grounding (a request's explicit prompt, else the grounder, else a default prompt built from the
request's hints) happens once per image, then :class:`model.pipeline.diffusion.SpaSemSRPipeline`
runs (arXiv 2603.14112, Fig. 2). Progress is reported as ``(stage, step, total)`` with stages
``grounding``, ``encode``, ``denoise`` (after every step, 1..N) and ``decode``; an exception
raised by the callback propagates unchanged, which is how the worker cancels a job.
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from model.blocks.text import DEFAULT_NEGATIVE_PROMPT, default_prompt
from model.pipeline.diffusion import SpaSemSRPipeline
from model.pipeline.performance import (
    PerformanceSettings,
    WarmUpReport,
    apply_performance,
    compiled_graph_count,
)
from model.pipeline.prompt import GroundedPrompt, Grounder
from model.upscalers.base import ModelCard, ProgressCallback, UpscaleOptions, UpscaleResult

logger = logging.getLogger(__name__)

VERSION = "1"
"""Version of the SpaSemSR pipeline code (blocks and sampling), shown on the model card."""


class SpaSemSRUpscaler:
    """SpaSemSR behind the worker's upscaler interface. Build it with :meth:`from_pretrained`."""

    def __init__(
        self,
        pipeline: SpaSemSRPipeline,
        *,
        weights: str,
        grounder: Grounder | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.grounder = grounder
        self.warm_up_report: WarmUpReport | None = None
        """What :meth:`warm_up` did (time, compiled shapes), once it has run."""
        trained = bool(pipeline.config.get("trained", False))
        configuration = str(pipeline.config.get("configuration", "custom"))
        dtype = str(pipeline.unet.dtype).removeprefix("torch.")
        description = (
            "SpaSemSR spatial-semantic guided diffusion super-resolution (arXiv 2603.14112)"
            f", {configuration} configuration"
        )
        if not trained:
            description += "; UNTRAINED weights: outputs are not meaningful super-resolution"
        self._card = ModelCard(
            name="spasemsr",
            version=VERSION,
            configuration=configuration,
            # The folder's name, never its path: the card is shown to every client.
            weights=Path(weights).name or weights,
            trained=trained,
            device=str(pipeline.device),
            dtype=dtype,
            description=description,
            source=(
                "a trained SpaSemSR pipeline folder"
                if trained
                else "seeded random initialisation (no trained SpaSemSR checkpoint is public)"
            ),
            licence=str(pipeline.config.get("licence", "")),
        )
        if not trained:
            logger.warning(
                "SpaSemSR pipeline at %s has untrained weights (%s)", weights, configuration
            )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        grounder: Grounder | None = None,
        performance: PerformanceSettings | None = None,
    ) -> SpaSemSRUpscaler:
        """Load a saved pipeline folder (``model_index.json`` + components) onto ``device`` in
        ``dtype``; ``performance`` (its dtypes take precedence over ``dtype``) is applied after
        loading, its compilation happens at :meth:`warm_up`."""
        pipeline = SpaSemSRPipeline.from_pretrained(str(path), dtype=dtype)
        pipeline.set_progress_bar_config(disable=True)
        pipeline = pipeline.to(device)
        if performance is not None:
            apply_performance(pipeline, performance)
        return cls(pipeline, weights=str(path), grounder=grounder)

    @property
    def card(self) -> ModelCard:
        return self._card

    def warm_up(self) -> None:
        """Compile first, then one small run through every stage (kernels, allocator, lazy
        initialisation). The worker calls this before it reports ready.

        With shape buckets every served shape is compiled here (and captured as a CUDA graph:
        three runs each, one to warm up, one to record, one to replay), so no request compiles.
        Compiled without buckets, only the shapes served most: a full tile (CFG batch), and a
        full batch of tiles when tiles are batched. The report is logged and kept as
        :attr:`warm_up_report`.
        """
        started = self._now()
        graphs = compiled_graph_count()
        performance = self.pipeline.performance
        shapes: list[tuple[int, int, int]] = []
        if performance.compile and performance.tile_buckets:
            shapes = self.pipeline.warm_up_shapes(repeats=3 if performance.cuda_graphs else 1)
        elif performance.compile:
            for side, scale in self.warm_up_sizes():
                image = Image.new("RGB", (side, side), (128, 128, 128))
                self.upscale(image, UpscaleOptions(scale=scale, steps=2, seed=0))
        compiled = self._now()
        image = Image.new("RGB", (16, 16), (128, 128, 128))
        self.upscale(image, UpscaleOptions(scale=2, steps=2, seed=0))
        report = WarmUpReport(
            seconds=self._now() - started,
            compile_seconds=compiled - started,
            shapes=tuple(shapes),
            graphs=compiled_graph_count() - graphs,
        )
        self.warm_up_report = report
        logger.info(
            "SpaSemSR warmed up in %.2f s (compiling %.2f s: %d shapes, %d graphs)",
            report.seconds, report.compile_seconds, len(report.shapes), report.graphs,
        )  # fmt: skip

    def warm_up_sizes(self, tile_size: int = 512, scale: int = 4) -> list[tuple[int, int]]:
        """``(input side, scale)`` of the warm-up jobs that compile the served shapes: one full
        tile, then (with tile batching) a grid of at least one full batch of tiles."""
        pipeline = self.pipeline
        sizes = [(tile_size // scale, scale)]
        batch = pipeline.performance.tile_batch_size
        if batch > 1:
            side = tile_size  # output pixels
            while True:
                cells = side // pipeline.vae_scale_factor
                if len(pipeline._tiles(cells, cells, tile_size, None)) >= batch:
                    break
                side += tile_size // 2
            sizes.append((side // scale, scale))
        return sizes

    def _ground(
        self, image: Image.Image, options: UpscaleOptions
    ) -> tuple[GroundedPrompt, str, dict[str, float]]:
        if options.prompt is not None:
            return options.prompt, "request", {}
        if self.grounder is not None:
            grounding = self.grounder.ground(
                image, tags_hint=options.tags_hint, caption_hint=options.caption_hint
            )
            return grounding.prompt, "grounder", dict(grounding.timings)
        return (
            default_prompt(tags_hint=options.tags_hint, caption_hint=options.caption_hint),
            "default",
            {},
        )

    def _grounding_trained(self, source: str) -> bool | None:
        """Whether the tags and boxes come from trained grounding models (``None``: no model
        produced them: they were given in the request or are the default prompt)."""
        if source != "grounder" or self.grounder is None:
            return None
        config = getattr(self.grounder, "config", None)
        return bool(getattr(config, "trained", False))

    def _now(self) -> float:
        if self.pipeline.device.type == "cuda":
            torch.cuda.synchronize(self.pipeline.device)
        return time.perf_counter()

    def upscale(
        self,
        image: Image.Image,
        options: UpscaleOptions,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> UpscaleResult:
        started = self._now()
        image = image.convert("RGB") if image.mode != "RGB" else image
        if on_progress is not None:
            on_progress("grounding", 0, 1)
        prompt, source, grounding_timings = self._ground(image, options)
        grounded = self._now()
        if on_progress is not None:
            on_progress("grounding", 1, 1)

        seed = options.seed if options.seed is not None else secrets.randbits(31)
        output = self.pipeline(
            image,
            scale=options.scale,
            prompt=prompt,
            negative_prompt=(
                options.negative_prompt
                if options.negative_prompt is not None
                else DEFAULT_NEGATIVE_PROMPT
            ),
            num_inference_steps=options.steps,
            guidance_scale=options.guidance_scale,
            scheduler=options.scheduler,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            color_fix=options.color_fix,
            tile_size=options.tile_size,
            callback=on_progress,
        )
        total = self._now() - started
        result_image = output.images[0]
        assert isinstance(result_image, Image.Image)
        timings = {
            "grounding": grounded - started,
            "encode": output.timings["encode"],
            "denoise": output.timings["denoise"],
            "decode": output.timings["decode"],
            "total": total,
        }
        details: dict[str, Any] = {
            "grounding": {
                **prompt.to_json(),
                "source": source,
                "trained": self._grounding_trained(source),
                "timings": grounding_timings,
            },
            "seed": seed,
        }
        return UpscaleResult(image=result_image, timings=timings, details=details)
