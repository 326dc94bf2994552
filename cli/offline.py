"""``spasemsr eval`` and ``spasemsr weights``: model work on this machine, no service needed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from core.settings import Settings

if TYPE_CHECKING:
    from model.evaluation import EvaluationReport, UpscaleFn


def evaluate_folders(
    datasets: list[Path],
    *,
    out_dir: Path,
    settings: Settings,
    include_spasemsr: bool,
    steps: int,
    seed: int,
    max_images: int | None,
    clip_model: Path | None,
    lpips_backbone: Path | None,
    lpips_linear: Path | None,
) -> EvaluationReport:
    """The protocol of DESIGN 1.5 over data-set folders, with the baselines beside SpaSemSR."""
    from model.evaluation import evaluate, upscale_fn
    from model.metrics import LearnedMetricPaths
    from worker.engine import load_upscaler

    upscalers: Mapping[str, UpscaleFn] = {}
    if include_spasemsr:
        settings.model.upscaler = "spasemsr"
        upscalers = {"SpaSemSR (ours)": upscale_fn(load_upscaler(settings), steps=steps, seed=seed)}
    return evaluate(
        datasets,
        upscalers,
        out_dir=out_dir,
        metric_paths=LearnedMetricPaths(
            clip_model=clip_model, lpips_backbone=lpips_backbone, lpips_linear=lpips_linear
        ),
        max_images=max_images,
    )


def assemble_weights(
    output: Path,
    *,
    base: str,
    sam: str | None,
    blocks: Path | None,
    configuration: str,
    overwrite: bool,
) -> Path:
    """A full-size pipeline folder from SD2 + SAM component folders and trained blocks (or
    freshly initialised ones, marked untrained)."""
    from model.assemble import assemble_pipeline

    return assemble_pipeline(
        output,
        base=base,
        sam=sam,
        blocks=blocks,
        configuration=configuration,
        overwrite=overwrite,
    )
