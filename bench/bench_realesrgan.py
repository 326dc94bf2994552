"""Real-ESRGAN (Wang et al. 2021) upscaling on this machine: time, peak memory, tiles.

    python bench/bench_realesrgan.py                # x4plus 128² and 512², animevideov3 both
    python bench/bench_realesrgan.py --large        # also 1024² -> 4096² (x4plus: ~17 min
                                                    # on a 2-core CPU, 4x the 512² case)
    python bench/bench_realesrgan.py --device cuda --threads 8

Each case runs in a fresh subprocess (``--case``), so the peak resident memory of one case cannot
hide in another's: the peak is the child's ``ru_maxrss`` after the job, next to its RSS before the
job (weights loaded and warmed up). The image is ``chelsea`` (scikit-image) resized to the input
side; ``--tile-size`` is the request option (output pixels of one tile at the network's x4; the
default 512 means 128-px input tiles). The models are converted once into ``--cache-root``
(default ``var/models``, the worker's cache).

CPU threads default to the worker's setting (half the cores, at most 4). Figures, not pass/fail:
the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {
    # name: (model, input side)
    "x4plus-128": ("realesrgan-x4plus", 128),
    "x4plus-512": ("realesrgan-x4plus", 512),
    "animevideov3-128": ("realesr-animevideov3", 128),
    "animevideov3-512": ("realesr-animevideov3", 512),
}
LARGE_CASES = {
    "x4plus-1024": ("realesrgan-x4plus", 1024),
    "animevideov3-1024": ("realesr-animevideov3", 1024),
}


def worker_threads() -> int:
    """The worker's default for CPU inference (worker/engine.py: half the cores, at most 4)."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def run_case(args: argparse.Namespace) -> None:
    """One case in this (fresh) process; prints one JSON line."""
    import torch
    from PIL import Image

    from model.evaluation.photos import load_photo
    from model.upscalers.base import UpscaleOptions
    from model.upscalers.realesrgan import RealESRGANUpscaler

    torch.set_num_threads(args.threads)
    name, side = {**CASES, **LARGE_CASES}[args.case]
    started = time.perf_counter()
    upscaler = RealESRGANUpscaler.from_catalogue(
        name, cache_root=args.cache_root, device=args.device
    )
    upscaler.warm_up()
    load = time.perf_counter() - started
    image = load_photo("chelsea").resize((side, side), Image.Resampling.BICUBIC)
    cuda = args.device.startswith("cuda")
    if cuda:  # the peak of this job alone, above the loaded weights
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _current_rss()
    started = time.perf_counter()
    result = upscaler.upscale(image, UpscaleOptions(scale=4, tile_size=args.tile_size))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    gpu_peak = torch.cuda.max_memory_allocated() if cuda else 0
    # ru_maxrss is in KiB on Linux.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "case": args.case,
                "model": name,
                "input": side,
                "output": result.image.width,
                "tiles": result.details["tiles"],
                "tile_input_px": upscaler.tile_for(UpscaleOptions(tile_size=args.tile_size)),
                "overlap": upscaler.overlap,
                "load_s": load,
                "seconds": seconds,
                "rss_before": rss_before,
                "peak_rss": peak,
                "gpu_peak": gpu_peak,
                "threads": torch.get_num_threads(),
            }
        )
    )


def _current_rss() -> int:
    with open("/proc/self/statm") as statm:  # noqa: PTH123 (a proc file, not a path to build)
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=worker_threads())
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--cache-root", type=Path, default=ROOT / "var" / "models")
    parser.add_argument("--large", action="store_true", help="also the 1024² -> 4096² cases")
    parser.add_argument("--only", nargs="*", help="run just these cases")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        run_case(args)
        return
    cases = list(CASES) + (list(LARGE_CASES) if args.large else [])
    if args.only:
        cases = [case for case in cases if case in args.only]
    from model.upscalers.realesrgan import ensure_converted

    for model in dict.fromkeys({**CASES, **LARGE_CASES}[case][0] for case in cases):
        ensure_converted(model, args.cache_root)  # first use converts: not part of any case
    print(f"# Real-ESRGAN bench: {args.device}, {args.threads} threads, tile_size {args.tile_size}")
    print(
        "\n| model | input | output | tiles (input px + context) | load + warm-up | upscale "
        "| RSS before | peak RSS | peak GPU allocated |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    mib = 1024**2
    for case in cases:
        command = [
            sys.executable,
            __file__,
            "--case",
            case,
            "--device",
            args.device,
            "--threads",
            str(args.threads),
            "--tile-size",
            str(args.tile_size),
            "--cache-root",
            str(args.cache_root),
        ]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            print(f"| {case} | failed: {completed.stderr.strip().splitlines()[-1:]} |")
            continue
        row = json.loads(completed.stdout.strip().splitlines()[-1])
        print(
            f"| {row['model']} | {row['input']}² | {row['output']}² "
            f"| {row['tiles']} ({row['tile_input_px']} + {row['overlap']}) "
            f"| {row['load_s']:.1f} s | {row['seconds']:.1f} s "
            f"| {row['rss_before'] / mib:.0f} MiB | {row['peak_rss'] / mib:.0f} MiB "
            f"| {row['gpu_peak'] / mib:.0f} MiB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
