"""``spasemsr eval`` and ``spasemsr weights``: model work on this machine, no service needed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from core.settings import Settings

if TYPE_CHECKING:
    from model.evaluation.benchmark import EvaluationReport, UpscaleFn


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
    """The protocol of docs/design.md 1.5 over data-set folders, the baselines beside SpaSemSR."""
    from model.evaluation.benchmark import evaluate
    from model.evaluation.metrics import LearnedMetricPaths

    return evaluate(
        datasets,
        served_upscalers(settings, include_spasemsr=include_spasemsr, steps=steps, seed=seed),
        out_dir=out_dir,
        metric_paths=LearnedMetricPaths(
            clip_model=clip_model, lpips_backbone=lpips_backbone, lpips_linear=lpips_linear
        ),
        max_images=max_images,
    )


def evaluate_bundled_photos(
    *,
    out_dir: Path,
    settings: Settings,
    include_spasemsr: bool,
    steps: int,
    seed: int,
    crop: int,
    photos: list[str] | None,
) -> EvaluationReport:
    """Real photographs bundled with scikit-image, degraded with the project's Real-ESRGAN
    degradation at a fixed seed: bicubic, Lanczos, Real-ESRGAN x4plus and SpaSemSR, with a
    side-by-side figure."""
    from model.evaluation.photos import PHOTOS, evaluate_photos

    unknown = sorted(set(photos or ()) - set(PHOTOS))
    if unknown:  # before any model is loaded
        raise ValueError(
            f"Unknown photo(s): {', '.join(unknown)}; bundled: {', '.join(sorted(PHOTOS))}."
        )
    return evaluate_photos(
        served_upscalers(settings, include_spasemsr=include_spasemsr, steps=steps, seed=seed),
        out_dir=out_dir,
        seed=seed,
        crop=crop,
        photos=photos,
    )


def served_upscalers(
    settings: Settings, *, include_spasemsr: bool, steps: int, seed: int
) -> Mapping[str, UpscaleFn]:
    """The service's trained Real-ESRGAN x4plus and (optionally) SpaSemSR, loaded as the
    worker loads them (own weights from ``SPASEMSR_MODEL__WEIGHTS`` / ``__PATH`` included);
    a row of untrained weights says so in its name."""
    from core.models import ModelName
    from model.evaluation.benchmark import upscale_fn
    from worker.engine import load_upscaler

    esrgan = load_upscaler(settings, ModelName.REALESRGAN_X4PLUS)
    upscalers: dict[str, UpscaleFn] = {"Real-ESRGAN x4plus": upscale_fn(esrgan)}
    if include_spasemsr:
        spasemsr = load_upscaler(settings, ModelName.SPASEMSR)
        label = "SpaSemSR (ours)" if spasemsr.card.trained else "SpaSemSR (untrained weights)"
        upscalers[label] = upscale_fn(spasemsr, steps=steps, seed=seed)
    return upscalers


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
    from model.configs.assemble import assemble_pipeline

    return assemble_pipeline(
        output,
        base=base,
        sam=sam,
        blocks=blocks,
        configuration=configuration,
        overwrite=overwrite,
    )
