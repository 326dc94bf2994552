"""End-to-end SpaSemSR speed: the straightforward and the optimised settings side by side.

    python bench/bench_gpu.py --config sd2 --device cuda                 # the H200 benchmark
    python bench/bench_gpu.py --config tiny --device cpu --repeats 3     # the same script on CPU

The subject is the pipeline with random weights (speed does not depend on weight values): the
``sd2`` configuration (SD-2-base UNet and VAE, OpenCLIP-H text tower, SAM ViT-B, the ControlNet
and attention additions) with the full-size grounder (DRM, CLIP tagger, Grounding DINO), or both
at ``tiny`` size. Each job runs as the worker runs it (:class:`model.spasemsr.SpaSemSRUpscaler`):
grounding, text and visual encoders, 20 denoising steps with classifier-free guidance, tiled VAE
decode. With ``--realesrgan`` the served Real-ESRGAN models follow on the same device
(``bench/bench_realesrgan.py``: 128² -> 512² and 512² -> 2048², time and peak memory). Two
SpaSemSR cases: ``small`` (tile/4 input, x4: 128² -> 512² for sd2) and ``large`` (tile-size
input, x4, tiled: 512² -> 2048² for sd2).

For each setting (:class:`model.performance.PerformanceSettings` presets): the warm-up (build and
load, then the worker's own warm-up with compilation and CUDA-graph capture, then the first job of
each case), then the median of ``--repeats`` jobs per stage, timed with CUDA events recorded from
the progress callback (``time.perf_counter`` on CPU); peak memory (``max_memory_allocated`` per
case on CUDA, the process's peak resident set on CPU). FLOPs per stage are counted once per case
with ``torch.utils.flop_counter.FlopCounterMode`` on the eager fp32 pipeline (matrix products,
convolutions and attention; compiled code is not visible to the counter and does the same work),
and divided by each setting's stage time, against a bf16 matrix-product ceiling measured in the
same run. The relative error is that of the optimised output image against the fp32 one, same
seed.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.configs import CONFIGURATIONS, build_pipeline  # noqa: E402
from model.performance import (  # noqa: E402
    PerformanceSettings,
    apply_performance,
    attention_context,
    count_flops,
    relative_error,
)
from model.prompt import Grounder  # noqa: E402
from model.spasemsr import SpaSemSRUpscaler  # noqa: E402
from model.upscaler import UpscaleOptions  # noqa: E402

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


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset, or the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


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
        from model.grounding import configs as grounding_configs
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
    reset_peak(device)
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
        reset_peak(device)
        runs = []
        for _ in range(repeats):
            job()
            runs.append(clock.stages())
        result.peak_gib[case.name] = peak_memory_gib(device)
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
    from model.attention import INPUTS_KEY, SpaSemSRAttentionInputs
    from model.encoders import visual_guidance
    from model.tiling import tiled_vae_decode, tiled_vae_encode

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
            for tile in tiles:
                pixels = tile.scaled(pipeline.vae_scale_factor)
                crop = torch.empty(1, 3, pixels.height, pixels.width, device=meta)
                visual_guidance(pipeline.image_encoder, pipeline.semantic_encoder, crop)
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
        f"{ceiling:.1f} TFLOP/s",
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
            "peak memory (GiB)": [f"{r.peak_gib[case.name]:.2f}" for r in results],
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--config", choices=tuple(CONFIGURATIONS), default="sd2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default="small,large", help="comma-separated: small, large")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--baseline-repeats", type=int, default=None, help="repeats of the straightforward run"
    )
    parser.add_argument("--no-grounding", action="store_true", help="skip the grounding stage")
    parser.add_argument("--autotune", action="store_true", help="Inductor max-autotune")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--count-only",
        action="store_true",
        help="only the FLOPs per stage from shapes (meta device, no weights, seconds on a CPU)",
    )
    parser.add_argument(
        "--realesrgan",
        choices=("also", "only"),
        default=None,
        help="the served Real-ESRGAN models on the same device, after SpaSemSR or alone",
    )
    return parser.parse_args(argv)


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
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        # The fp32 baseline means fp32: no TF32 in matrix products or convolutions.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
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
                }
                for r in results
            ],
        }
        args.json.write_text(json.dumps(figures, indent=2))
    if args.realesrgan == "also":
        run_realesrgan(device)


if __name__ == "__main__":
    main()
