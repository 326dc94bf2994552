"""SpaSemSR training figures for the ``tiny`` configuration on this machine (CPU by default).

    python bench/bench_training.py                       # 64-px patches, batch 4, 30 steps
    python bench/bench_training.py --resolution 128 --batch-size 8 --threads 2
    python bench/bench_training.py --steps 200 --learning-rate 1e-3 --warmup-steps 0 --curve c.csv

Runs :func:`model.training.trainer.train` end to end on generated HR images (no grounder: generic
prompts; each LR's caption measured from it; no checkpoint until the last step) and reports
optimiser steps per second over the measured steps (after ``--warmup`` steps), the parameter
split (trained / frozen), the peak resident memory of the process (sampled with psutil) above
the memory before training, and each loss term's curve: first and last value, and the mean of
the first and of the last ``--window`` steps (one step's value is one random batch, noisy);
``--curve`` writes every step's terms as CSV.

Figures, not pass/fail: the machine may be shared.
"""

from __future__ import annotations

import argparse
import csv
import logging
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

from model.configs.spasemsr import build_tiny_pipeline
from model.training.config import TrainingConfig
from model.training.trainer import train


class PeakRss:
    """Samples the process's resident memory every few milliseconds while active."""

    def __init__(self, interval: float = 0.005) -> None:
        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def write_images(folder: Path, count: int, side: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        small = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
        image = Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)
        image.save(folder / f"image-{index}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--learning-rate", type=float, default=TrainingConfig.learning_rate)
    parser.add_argument("--warmup-steps", type=int, default=TrainingConfig.warmup_steps)
    parser.add_argument("--window", type=int, default=20, help="steps averaged per curve end")
    parser.add_argument("--curve", type=Path, help="CSV file for every step's loss terms")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_images(root / "data" / "hr", 16, args.resolution * 2)
        pipeline = build_tiny_pipeline(seed=0)
        trained = sum(
            p.numel()
            for name in ("image_encoder", "semantic_encoder", "controlnet", "unet_attention")
            for p in getattr(pipeline, name).parameters()
        )
        frozen = sum(
            p.numel()
            for name in ("unet", "vae", "text_encoder")
            for p in getattr(pipeline, name).parameters()
        )
        config = TrainingConfig(
            resolution=args.resolution,
            batch_size=args.batch_size,
            max_steps=args.warmup + args.steps,
            checkpoint_every=10**9,
            log_every=10**9,
            gradient_checkpointing=args.gradient_checkpointing,
            learning_rate=args.learning_rate,
            warmup_steps=args.warmup_steps,
        )
        before = psutil.Process().memory_info().rss
        with PeakRss() as peak:
            report = train(
                config,
                data_dir=root / "data",
                output_dir=root / "run",
                pipeline=pipeline,
            )
        # the last step's time includes writing the pipeline folder; keep it out of the rate
        durations = report.step_seconds[args.warmup : -1] or report.step_seconds
        rate = len(durations) / sum(durations)

    print(
        f"tiny SpaSemSR training on {torch.device('cpu')} ({args.threads} thread(s)): "
        f"{args.resolution}-px patches, batch {args.batch_size}, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}"
    )
    print(f"parameters: trained {trained / 1e6:.3f} M, frozen {frozen / 1e6:.3f} M")
    print(f"steps/s: {rate:.2f} (median step {1000 * float(np.median(durations)):.0f} ms)")
    grown = (peak.peak - before) / 2**20
    print(f"peak RSS: {peak.peak / 2**20:.0f} MiB ({grown:+.0f} MiB during training)")
    print_curves(report.losses, args.window)
    if args.curve is not None:
        write_curve(args.curve, report.losses)


def print_curves(losses: list[dict[str, float]], window: int) -> None:
    """Per term: first and last step, and the means of the first and last ``window`` steps."""
    width = max(len(name) for name in losses[0])
    print(f"{len(losses)} steps; per term: first, mean of first {window}, of last {window}, last")
    for name in losses[0]:
        values = [step[name] for step in losses]
        head, tail = np.mean(values[:window]), np.mean(values[-window:])
        print(
            f"  {name:<{width}}  {values[0]:.4f}  {head:.4f}  {tail:.4f}  {values[-1]:.4f}"
            f"  ({100 * (tail - head) / head:+.0f} %)"
        )


def write_curve(path: Path, losses: list[dict[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", *losses[0]])
        writer.writeheader()
        for step, terms in enumerate(losses, start=1):
            writer.writerow({"step": step, **terms})


if __name__ == "__main__":
    main()
