"""Builds the upscaler that a worker keeps warm, from settings."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from core.models import ModelName, worker_models
from core.settings import Settings
from model.pipeline.prompt import Grounder
from model.upscalers.base import Upscaler
from model.upscalers.lanczos import LanczosUpscaler

if TYPE_CHECKING:
    import torch

    from model.pipeline.performance import PerformanceSettings

logger = logging.getLogger(__name__)


def resolve_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_threads(configured: int | None) -> int:
    """Threads for CPU inference. By default half the cores (at most 4): the API and Redis
    share the machine, and oversubscribed torch threads wait on each other (on a busy 2-core
    machine a tiny job took 17 s with 2 threads and 0.2 s with 1)."""
    if configured:
        return configured
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def load_upscalers(settings: Settings) -> dict[ModelName, Upscaler]:
    """Every model this worker holds (``SPASEMSR_WORKER__MODELS``), loaded once, in order."""
    return {name: load_upscaler(settings, name) for name in worker_models(settings)}


def load_upscaler(settings: Settings, name: ModelName) -> Upscaler:
    if name is ModelName.LANCZOS:
        return LanczosUpscaler()
    if name is ModelName.SPASEMSR:
        return _load_spasemsr(settings)
    return _load_realesrgan(settings, name)


def _load_realesrgan(settings: Settings, name: ModelName) -> Upscaler:
    from model.upscalers.realesrgan import RealESRGANUpscaler

    device = _prepare_device(settings)
    own = settings.model.weights.get(name)
    if own is not None:
        logger.info("loading %s from your weights %s on %s", name.value, own, device)
        upscaler: Upscaler = RealESRGANUpscaler.from_weights(
            own, name=name.value, device=device, dtype=_dtype(settings)
        )
        return upscaler
    logger.info("loading %s (published weights) on %s", name.value, device)
    published: Upscaler = RealESRGANUpscaler.from_catalogue(
        name.value, cache_root=settings.var_dir / "models", device=device, dtype=_dtype(settings)
    )
    return published


def _prepare_device(settings: Settings) -> str:
    import torch

    device = resolve_device(settings.model.device)
    if device == "cpu":
        torch.set_num_threads(cpu_threads(settings.model.cpu_threads))
    return device


def _dtype(settings: Settings) -> torch.dtype:
    import torch

    return {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "auto": torch.float32,
    }[settings.model.dtype]


def _load_spasemsr(settings: Settings) -> Upscaler:

    from model.configs.spasemsr import ensure_demo_pipeline
    from model.upscalers.spasemsr import SpaSemSRUpscaler

    device = _prepare_device(settings)
    dtype = _dtype(settings)
    path = settings.model.path or ensure_demo_pipeline(
        settings.var_dir / "models" / "spasemsr-tiny"
    )
    performance = _performance(settings, device)
    logger.info("loading SpaSemSR from %s on %s (%s)", path, device, dtype)
    upscaler: Upscaler = SpaSemSRUpscaler.from_pretrained(
        path,
        device=device,
        dtype=dtype,
        grounder=_load_grounder(settings, device, dtype),
        performance=performance,
    )
    return upscaler


def _performance(settings: Settings, device: str) -> PerformanceSettings | None:
    """The optimised speed settings on CUDA unless turned off; an explicit ``dtype`` other than
    ``auto`` wins over the preset's."""
    from dataclasses import replace

    import torch

    from model.pipeline.performance import DTYPES, PerformanceSettings

    if settings.model.optimise == "off" or torch.device(device).type != "cuda":
        return None
    performance = PerformanceSettings.optimised(device)
    if settings.model.dtype != "auto":
        chosen = DTYPES[settings.model.dtype]
        # An fp16 VAE decoder can overflow; fp32 keeps it correct.
        vae_dtype = torch.float32 if chosen == torch.float16 else chosen
        performance = replace(performance, dtype=chosen, vae_dtype=vae_dtype)
    return performance


def _load_grounder(settings: Settings, device: str, dtype: torch.dtype) -> Grounder:
    from model.configs.grounding import ensure_demo_grounder
    from model.grounding import SpaSemSRGrounder

    path = settings.model.grounder_path or ensure_demo_grounder(
        settings.var_dir / "models" / "grounder-tiny"
    )
    grounder: Grounder = SpaSemSRGrounder.from_pretrained(path, device=device, dtype=dtype)
    return grounder
