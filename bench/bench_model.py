# mypy: disallow-untyped-calls=False
"""SpaSemSR model figures on this machine (CPU unless --device says otherwise).

    python bench/bench_model.py                # tiny pipeline stages + sd2 step (a minute or two on
    CPU)
    python bench/bench_model.py --skip-sd2     # tiny pipeline only (seconds)

1. The ``tiny`` pipeline, per stage (text, VAE encode, visual guidance, denoise, decode), median
   of ``--repeats`` runs after a warm-up, for a few input sizes (the 512-px case runs tiled).
2. The ``sd2`` configuration with random weights (real shapes: SD-2-base UNet, SAM ViT-B,
   OpenCLIP-H text tower): parameter counts of every block, then one Spatial-Semantic ControlNet
   and UNet step at a 64x64 latent (batch 2, as with classifier-free guidance): seconds, and the
   peak resident memory of the process during the step (sampled with psutil) above the memory
   before it.

Figures, not pass/fail: random weights time the same work as trained ones; the machine may be
shared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.blocks.attention import INPUTS_KEY, SpaSemSRAttentionInputs  # noqa: E402
from model.blocks.controlnet import SpatialSemanticControlNet  # noqa: E402
from model.blocks.unet_attention import SpaSemSRUNetAttention  # noqa: E402
from model.configs.spasemsr import SD2, build_tiny_pipeline  # noqa: E402

STAGES = ("text", "vae_encode", "guidance", "denoise", "decode")


def test_image(size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([200 * xx, 200 * yy, 100 + 80 * xx * yy], axis=-1) + rng.normal(
        0, 8, (size, size, 3)
    )
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def bench_tiny(device: str, repeats: int) -> None:
    pipe = build_tiny_pipeline(seed=0).to(device)
    cases = [(32, 4, 4, 512), (64, 4, 4, 512), (128, 4, 4, 256)]  # (input side, scale, steps, tile)
    print("\n## tiny pipeline (seconds, median of", repeats, "runs after a warm-up)\n")
    print("| input | output | steps | tiles | " + " | ".join(STAGES) + " | total |")
    print("|---|---|---|---|" + "---|" * (len(STAGES) + 1))
    for side, scale, steps, tile in cases:
        image = test_image(side)

        def once(
            tile: int = tile, steps: int = steps, scale: int = scale, image: Image.Image = image
        ) -> dict[str, float]:
            started = time.perf_counter()
            output = pipe(
                image,
                scale=scale,
                num_inference_steps=steps,
                tile_size=tile,
                generator=torch.Generator().manual_seed(0),
            )
            return {**output.timings, "total": time.perf_counter() - started}

        once()
        runs = [once() for _ in range(repeats)]
        medians = {key: statistics.median(run[key] for run in runs) for key in (*STAGES, "total")}
        latent = side * scale // pipe.vae_scale_factor
        tiles = len(pipe._tiles(latent, latent, tile, None))
        cells = " | ".join(f"{medians[key]:.3f}" for key in (*STAGES, "total"))
        print(
            f"| {side}² | {side * scale}² (tile {tile}) | {steps} | {tiles} | {cells} |", flush=True
        )


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class PeakRSS:
    """Peak resident set size of this process while the block runs, sampled every 5 ms."""

    def __init__(self, interval: float = 0.005) -> None:
        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.before = self.process.memory_info().rss
        self.peak = self.before
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def bench_sd2(device: str) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, SamVisionConfig, SamVisionModel

    from model.blocks.encoders import ImageEncoder

    print("\n## sd2 configuration, random weights\n")
    with torch.device("meta"):
        vae: Any = AutoencoderKL(**SD2.vae)  # diffusers' classes are untyped
        text = CLIPTextModel(CLIPTextConfig(**SD2.text_encoder))
        sam = SamVisionModel(SamVisionConfig(**SD2.semantic_encoder))
        image_encoder = ImageEncoder(
            **{
                k: SD2.vae[k]
                for k in ("down_block_types", "block_out_channels", "layers_per_block")
            }
        )
    started = time.perf_counter()
    torch.manual_seed(0)
    unet: Any = UNet2DConditionModel(**SD2.unet)
    unet.eval()
    channels = 4 + SD2.semantic_encoder["output_channels"]
    controlnet = SpatialSemanticControlNet.from_unet(unet, conditioning_channels=channels).eval()
    additions = SpaSemSRUNetAttention.from_unet(unet).eval()
    additions.install(unet)
    for module in (unet, controlnet, additions):
        module.to(device)
    print(f"built UNet + ControlNet + additions in {time.perf_counter() - started:.1f}s\n")
    rows = [
        ("UNet (SD-2-base, frozen)", count(unet)),
        ("UNet additions: spatial text + semantic image attention (trained)", count(additions)),
        ("Spatial-Semantic ControlNet (trained)", count(controlnet)),
        (
            "  of which degradation-aware + spatial-semantic attention",
            count(controlnet.spatial_semantic),
        ),
        ("Image encoder (trained)", count(image_encoder)),
        ("Semantic encoder, SAM ViT-B (trained)", count(sam)),
        ("VAE (frozen)", count(vae)),
        ("Text encoder, OpenCLIP-H text tower (frozen)", count(text)),
    ]
    print("| block | parameters |\n|---|---|")
    for name, n in rows:
        print(f"| {name} | {n / 1e6:.1f} M |")
    trained = count(additions) + count(controlnet) + count(image_encoder) + count(sam)
    print(f"| **trained in total** | {trained / 1e6:.1f} M |")

    batch, side = 2, 64
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, side, side, generator=generator).to(device)
    text_states = torch.randn(batch, 77, 1024, generator=generator).to(device)
    spatial = torch.randn(batch, 77, 1024, generator=generator).to(device)
    guidance = torch.randn(batch, channels, side, side, generator=generator).to(device)
    timestep = torch.tensor(500, device=device)

    def step() -> tuple[float, float]:
        started = time.perf_counter()
        control = controlnet(
            sample, timestep, spatial_text=spatial, degradation_text=text_states, guidance=guidance
        )
        middle = time.perf_counter()
        unet(
            sample,
            timestep,
            encoder_hidden_states=text_states,
            down_block_additional_residuals=control.down_block_res_samples,
            mid_block_additional_residual=control.mid_block_res_sample,
            cross_attention_kwargs={
                INPUTS_KEY: SpaSemSRAttentionInputs(
                    spatial_text=spatial, semantic=control.embeddings
                )
            },
        )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return middle - started, time.perf_counter() - middle

    with torch.inference_mode():
        if device.startswith("cuda"):
            step()  # warm-up kernels
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as rss:
            controlnet_s, unet_s = step()
    print(
        f"\none step at a {side}x{side} latent, batch {batch} (CFG), {device}, "
        f"{torch.get_num_threads()} CPU threads:\n"
    )
    print("| ControlNet | UNet | step | process RSS before | peak RSS during | peak above before |")
    print("|---|---|---|---|---|---|")
    gib = 1024**3
    print(
        f"| {controlnet_s:.1f} s | {unet_s:.1f} s | {controlnet_s + unet_s:.1f} s "
        f"| {rss.before / gib:.2f} GiB | {rss.peak / gib:.2f} GiB "
        f"| {(rss.peak - rss.before) / gib:.2f} GiB |"
    )
    if device.startswith("cuda"):
        print(f"\npeak CUDA memory allocated: {torch.cuda.max_memory_allocated() / gib:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument("--skip-sd2", action="store_true", help="only the tiny pipeline")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# SpaSemSR model bench: torch {torch.__version__}, {args.device}, "
        f"{torch.get_num_threads()} threads"
    )
    bench_tiny(args.device, args.repeats)
    if not args.skip_sd2:
        bench_sd2(args.device)


if __name__ == "__main__":
    main()
