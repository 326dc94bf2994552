"""Per-stage time of the grounding stage (DRM, tagger, detector, caption) on this machine.

    python bench/bench_grounding.py                 # tiny configuration + full-size shapes
    python bench/bench_grounding.py --skip-full     # tiny configuration only (seconds)

Full size means the published shapes with random weights: RRDBNet 23 blocks x4, CLIP ViT-L/14,
Grounding DINO tiny (Swin-T + BERT-base). Random weights time the same work as real ones, except
that the detector keeps more boxes for NMS. The tag vocabulary is encoded once per process (timed
apart as "vocabulary"); the table shows the median of ``--repeats`` runs after a warm-up
on a 64 px image.
Figures, not pass/fail: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.configs.grounding import (  # noqa: E402
    build_full_size_grounder,
    build_tiny_grounder,
)
from model.grounding import SpaSemSRGrounder  # noqa: E402
from model.grounding.grounder import STAGES  # noqa: E402


def test_image(size: int, seed: int = 0) -> Image.Image:
    """A smooth gradient with noise: the estimates have something to measure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([200 * xx, 200 * yy, 100 + 80 * xx * yy], axis=-1)
    noisy = base + rng.normal(0, 8, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def measure(
    name: str,
    build: Callable[[], SpaSemSRGrounder],
    sizes: list[int],
    repeats: int,
) -> list[tuple[str, int, dict[str, float]]]:
    started = time.perf_counter()
    grounder = build()
    print(f"[{name}] built in {time.perf_counter() - started:.1f}s", flush=True)
    started = time.perf_counter()
    grounder.tagger.text_embeddings()
    vocabulary = time.perf_counter() - started
    vocabulary_size = len(grounder.tagger.vocabulary.tags)
    print(f"[{name}] vocabulary of {vocabulary_size} tags encoded in {vocabulary:.2f}s", flush=True)
    rows = []
    for size in sizes:
        image = test_image(size)
        with torch.inference_mode():
            # Warm-up (allocator, lazy initialisation) on a small image: a full-size DRM pass at
            # 512 px takes minutes on a laptop-class CPU.
            grounder.ground(test_image(64))
            runs = [grounder.ground(image).timings for _ in range(repeats)]
        median = {stage: statistics.median(run[stage] for run in runs) for stage in STAGES}
        median["vocabulary"] = vocabulary
        rows.append((name, size, median))
        print(f"[{name}] {size}px: " + ", ".join(f"{k} {v:.3f}s" for k, v in median.items()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-full", action="store_true", help="only the tiny configuration")
    parser.add_argument("--size", type=int, default=512, help="input side for full size")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (tiny)")
    parser.add_argument("--full-repeats", type=int, default=1, help="timed runs per full row")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = measure("tiny", build_tiny_grounder, [64, args.size], args.repeats)
    if not args.skip_full:
        rows += measure("full-size", build_full_size_grounder, [args.size], args.full_repeats)

    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    header = ["configuration", "input", *STAGES, "total", "vocabulary (once)"]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for name, size, timings in rows:
        total = sum(timings[stage] for stage in STAGES)
        cells = [f"{timings[stage]:.3f}" for stage in STAGES]
        print(
            " | ".join(
                [name, f"{size}x{size}", *cells, f"{total:.3f}", f"{timings['vocabulary']:.2f}"]
            )
        )


if __name__ == "__main__":
    main()
