"""Peak memory of one SpaSemSR job above the loaded model, as the output grows.

    python bench/bench_memory.py                          # 512² .. 4096² on CPU (a few minutes)
    python bench/bench_memory.py --sides 512,1024 --device cuda

Each case runs in a fresh process, so that no peak carries over from an earlier one: it builds the
``tiny`` pipeline (``model.configs.spasemsr.TINY``) with the worker's loop settings for the device
(:meth:`PerformanceSettings.optimised`, without compilation), runs a small job (the allocator,
lazy initialisation), takes that as the baseline, then runs one job of ``side/4`` px at x4. The
peak is the resident set's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``;
where that is not allowed, RSS sampled every 2 ms) on CPU, ``max_memory_allocated`` on CUDA;
the figure is peak minus baseline. On CPU the children run with glibc's ``mmap`` threshold fixed
at 64 KiB (``MALLOC_MMAP_THRESHOLD_``): freed buffers then go back to the system at once, so the
resident set follows what the job holds rather than what the allocator kept from an earlier phase
(``--malloc default`` keeps glibc's adaptive threshold). ``VAE alone`` runs the same process
with only the tiled VAE encode and decode of that size (``model.pipeline.tiling``), as the job runs
them: the encoder reads random pixels region by region (:class:`model.pipeline.tiling.Regions`), the
decoder hands its bands of rows to a consumer that drops them.

The result image (the PIL image the job returns, 4 bytes a pixel) is part of the peak; the table
also gives the working memory without it: on CUDA the result is host memory, which
``max_memory_allocated`` does not count, so that column is the CPU's stand-in for the GPU figure.
Goal (issue 17): the 4096² job within 1.5x of the 1024² one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024**2
RESULT_BYTES_PER_PIXEL = 4
"""What the job's result holds per pixel: PIL keeps an RGB image at 4 bytes a pixel."""
MMAP_THRESHOLD = "65536"
"""glibc's ``mmap`` threshold for the measured processes (bytes): every larger block is mapped
and unmapped on its own."""


def _status_bytes(key: str) -> int:
    """A ``/proc/self/status`` field (kB) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class PeakMemory:
    """Peak memory above the moment of :meth:`start`: CUDA allocated bytes, or the process's
    resident set (the kernel's high-water mark when it can be reset, else sampled)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.baseline = 0
        self._peak = 0
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return
        self.baseline = _status_bytes("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            self._peak = self.baseline
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _status_bytes("VmRSS"))
            time.sleep(0.002)

    def stop(self) -> int:
        """Peak bytes above the baseline."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated()) - self.baseline
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            return max(self._peak, _status_bytes("VmRSS")) - self.baseline
        return _status_bytes("VmHWM") - self.baseline


def child(side: int, *, tile: int, steps: int, device: str, vae_only: bool) -> dict[str, Any]:
    """One case, in this (fresh) process."""
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from model.configs.spasemsr import build_tiny_pipeline
    from model.pipeline.performance import PerformanceSettings, apply_performance
    from model.pipeline.tiling import Regions, tiled_vae_decode_stream, tiled_vae_encode

    pipeline = build_tiny_pipeline(seed=0).to(device)
    settings = PerformanceSettings.optimised(device)
    apply_performance(pipeline, replace(settings, compile=False, cuda_graphs=False))
    generator = torch.Generator().manual_seed(0)
    small = Image.new("RGB", (32, 32), (120, 130, 140))
    pipeline(small, scale=4, num_inference_steps=1, tile_size=tile, generator=generator)
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((side // 4, side // 4, 3)) * 255).astype(np.uint8))
    memory = PeakMemory(device)
    started = time.perf_counter()
    if vae_only:
        vae, factor = pipeline.vae, pipeline.vae_scale_factor
        vae_tile = tile // factor
        memory.start()
        with torch.no_grad():
            # Made on demand, region by region, as the job's upsampled image.
            pixels = Regions(
                lambda rows, cols: torch.rand(
                    1, 3, rows.stop - rows.start, cols.stop - cols.start, device=device
                ).mul_(2.0).sub_(1.0),
                side, side, torch.device(device),
            )  # fmt: skip
            latents = tiled_vae_encode(vae, pixels, tile=vae_tile, overlap=vae_tile // 8)
            tiled_vae_decode_stream(
                vae, latents, lambda top, rows: None, tile=vae_tile, overlap=vae_tile // 8
            )
        tiles, result_bytes = 0, 0
    else:
        memory.start()
        output = pipeline(
            image, scale=4, num_inference_steps=steps, tile_size=tile, generator=generator
        )
        assert output.images[0].size == (side, side)
        # Host memory, whatever the device: not in CUDA's allocated bytes.
        result_bytes = 0 if memory.cuda else side * side * RESULT_BYTES_PER_PIXEL
        cells = side // pipeline.vae_scale_factor
        tiles = len(pipeline._tiles(cells, cells, tile, None))
    peak = memory.stop()
    return {
        "side": side,
        "tile": tile,
        "vae_only": vae_only,
        "tiles": tiles,
        "peak_bytes": peak,
        "result_bytes": result_bytes,
        "seconds": time.perf_counter() - started,
        "device": device,
    }


def measure(
    side: int,
    *,
    tile: int,
    steps: int = 1,
    device: str = "cpu",
    vae_only: bool = False,
    fixed_mmap: bool = True,
) -> dict[str, Any]:
    """:func:`child` in a fresh Python process; its JSON result."""
    env = dict(os.environ)
    if fixed_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", str(side),
        "--tile", str(tile), "--steps", str(steps), "--device", device,
    ]  # fmt: skip
    if vae_only:
        command.append("--vae-only")
    completed = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def _working(row: dict[str, Any]) -> int:
    """Peak bytes above the baseline less the result image the job hands back."""
    return int(row["peak_bytes"]) - int(row["result_bytes"])


def table(rows: list[dict[str, Any]], vae: dict[int, dict[str, Any]]) -> str:
    reference = next((row for row in rows if row["side"] == 1024), rows[0])
    versus = f"{reference['side']}²"
    lines = [
        f"| output | tiles | peak above baseline | vs {versus} | of it the result image "
        f"| working memory (peak - result) | vs {versus} | VAE alone | job s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        peak, side = row["peak_bytes"], row["side"]
        alone = f"{vae[side]['peak_bytes'] / MiB:.0f} MiB" if side in vae else "-"
        lines.append(
            f"| {side}² | {row['tiles']} | {peak / MiB:.0f} MiB "
            f"| {peak / reference['peak_bytes']:.2f}x | {row['result_bytes'] / MiB:.0f} MiB "
            f"| {_working(row) / MiB:.0f} MiB | {_working(row) / _working(reference):.2f}x "
            f"| {alone} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sides", default="512,1024,2048,4096", help="output sides, px")
    parser.add_argument("--tile", type=int, default=256, help="tile size, output px")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-vae", action="store_true", help="skip the VAE-alone column")
    parser.add_argument(
        "--malloc", choices=("fixed", "default"), default="fixed", help="glibc mmap threshold"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--vae-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        result = child(
            args.child, tile=args.tile, steps=args.steps, device=args.device,
            vae_only=args.vae_only,
        )  # fmt: skip
        print(json.dumps(result))
        return
    sides = [int(side) for side in args.sides.split(",")]
    print(
        f"# SpaSemSR job memory: tiny pipeline, {args.device}, tile {args.tile}, "
        f"{args.steps} step(s), one process per case, glibc mmap threshold {args.malloc}\n"
    )
    rows, vae = [], {}
    fixed = args.malloc == "fixed"
    for side in sides:
        for vae_only in (False,) if args.no_vae else (False, True):
            result = measure(
                side, tile=args.tile, steps=args.steps, device=args.device, vae_only=vae_only,
                fixed_mmap=fixed,
            )  # fmt: skip
            if vae_only:
                vae[side] = result
            else:
                rows.append(result)
        print(f"measured {side}²", file=sys.stderr, flush=True)
    print(table(rows, vae))
    if args.json is not None:
        args.json.write_text(json.dumps({"jobs": rows, "vae": list(vae.values())}, indent=2))


if __name__ == "__main__":
    main()
