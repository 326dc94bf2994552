"""Builders only the tests use: generated images and data sets, tiny captioners.

Moved out of the runtime modules (model/evaluation/benchmark.py, model/configs/grounding.py),
which the service and the command line never call them from.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessorPil,
    BlipProcessor,
    BlipTextConfig,
    BlipVisionConfig,
)

from model.configs.grounding import TINY_IMAGE_SIDE, project_tokenizers
from model.evaluation.benchmark import Layout
from model.grounding.captioner import BlipCaptioner
from model.grounding.modules import frozen
from model.grounding.tagger import TagVocabulary
from model.training.degradations import RealESRGANDegradationConfig, degrade_image


def synthetic_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A procedural RGB scene: a colour gradient, shapes with hard edges, stripes and fine texture.

    It has both smooth regions and high frequencies, so SR methods are told apart.
    """
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    colours = rng.uniform(40, 215, (2, 3))
    t = (xx / max(width - 1, 1) + yy / max(height - 1, 1)) / 2
    base = colours[0] * (1 - t[..., None]) + colours[1] * t[..., None]
    period = rng.uniform(3.0, 9.0)
    angle = rng.uniform(0, math.pi)
    stripes = 25 * np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
    base += stripes[..., None] * (xx > width / 2)[..., None]
    base += rng.normal(0, 6, base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.uniform(0, width * 0.8), rng.uniform(0, height * 0.8)
        x1 = x0 + rng.uniform(width * 0.08, width * 0.4)
        y1 = y0 + rng.uniform(height * 0.08, height * 0.4)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.uniform() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.ellipse((x0, y0, x1, y1), fill=colour, outline=(0, 0, 0))
    for _ in range(4):
        points = [(rng.uniform(0, width), rng.uniform(0, height)) for _ in range(2)]
        draw.line(points, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=1)
    return image


def make_synthetic_dataset(
    root: Path,
    layout: Layout,
    *,
    count: int = 4,
    hr_size: tuple[int, int] = (128, 96),
    scale: int = 4,
    seed: int = 0,
    degradation: Literal["realesrgan", "bicubic"] = "realesrgan",
) -> Path:
    """Write ``count`` generated HR/LR pairs (LR only for ``lr_only``) in ``layout`` under ``root``.

    LR images come from the Real-ESRGAN degradation (seeded per image) or plain bicubic
    down-scaling. Returns ``root``.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if hr_size[0] % scale or hr_size[1] % scale:
        raise ValueError(f"hr_size {hr_size} must be a multiple of the scale {scale}")
    root = Path(root)
    config = RealESRGANDegradationConfig(scale=scale)
    for index in range(count):
        hr = synthetic_image(hr_size, seed * 1000 + index)
        if degradation == "realesrgan":
            lr = degrade_image(hr, seed=seed * 1000 + index, config=config)
        else:
            lr = hr.resize((hr.width // scale, hr.height // scale), Image.Resampling.BICUBIC)
        if layout == "realsr":
            camera = "Canon" if index % 2 == 0 else "Nikon"
            folder = root / camera / "Test" / str(scale)
            stem = f"{camera}_{index + 1:03d}"
            targets = [(folder / f"{stem}_HR.png", hr), (folder / f"{stem}_LR{scale}.png", lr)]
        elif layout == "drealsr":
            base = root / f"test_x{scale}"
            stem = f"synthetic_{index + 1:04d}"
            targets = [
                (base / "test_HR" / f"{stem}_x1.png", hr),
                (base / "test_LR" / f"{stem}_x{scale}.png", lr),
            ]
        elif layout == "gt_lq":
            stem = f"{index:07d}"
            targets = [(root / "gt" / f"{stem}.png", hr), (root / "lq" / f"{stem}.png", lr)]
        elif layout == "lr_only":
            targets = [(root / f"synthetic_{index + 1:03d}.png", lr)]
        else:
            raise ValueError(f"unknown layout {layout!r}")
        for path, image in targets:
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
    return root


def build_tiny_blip_captioner(seed: int = 0) -> BlipCaptioner:
    """A tiny BLIP captioning backend (random weights: its scene words are gibberish)."""
    torch.manual_seed(seed)
    _, tokenizer = project_tokenizers(TagVocabulary.default())
    text = BlipTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        encoder_hidden_size=32,
        intermediate_size=64,
        projection_dim=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        # [CLS] starts generation and [SEP] ends it (real BLIP adds a [DEC] token for the start).
        bos_token_id=int(tokenizer.cls_token_id),
        sep_token_id=int(tokenizer.sep_token_id),
        pad_token_id=int(tokenizer.pad_token_id),
    )
    vision = BlipVisionConfig(
        image_size=TINY_IMAGE_SIDE,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        projection_dim=16,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    model = frozen(
        BlipForConditionalGeneration(
            BlipConfig(text_config=text, vision_config=vision, projection_dim=16)
        )
    )
    processor = BlipProcessor(  # type: ignore[no-untyped-call]
        image_processor=BlipImageProcessorPil(
            size={"height": TINY_IMAGE_SIDE, "width": TINY_IMAGE_SIDE}
        ),
        tokenizer=tokenizer,
    )
    return BlipCaptioner(model, processor, max_new_tokens=6)
