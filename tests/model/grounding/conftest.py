"""Grounding test fixtures: generated photo-like images and one tiny grounder per session."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from model.configs.grounding import build_tiny_grounder
from model.grounding import SpaSemSRGrounder


def natural_image(size: int = 96, seed: int = 0) -> Image.Image:
    """A smooth gradient with sinusoidal texture and a few discs: edges, flat parts and texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    array = np.zeros((size, size, 3))
    for channel in range(3):
        array[..., channel] = 60 + 120 * (0.5 * xx + 0.3 * yy) + rng.uniform(-20, 20)
        for _ in range(6):
            fx, fy = rng.uniform(2, 12, 2)
            amplitude, phase = rng.uniform(3, 12), rng.uniform(0, 2 * np.pi)
            array[..., channel] += amplitude * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
    image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        x0, y0 = (int(v) for v in rng.integers(0, size, 2))
        w, h = (int(v) for v in rng.integers(size // 8, size // 3, 2))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
    return image


def add_noise(image: Image.Image, sigma: float, seed: int = 1) -> Image.Image:
    array = np.asarray(image, dtype=np.float64)
    noisy = array + np.random.default_rng(seed).normal(0.0, sigma, array.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))


def blur(image: Image.Image, radius: float) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else image


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


@pytest.fixture(scope="session")
def tiny_grounder() -> SpaSemSRGrounder:
    return build_tiny_grounder(seed=0)


@pytest.fixture(scope="session")
def tiny_grounder_folder(
    tiny_grounder: SpaSemSRGrounder, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return tiny_grounder.save_pretrained(tmp_path_factory.mktemp("grounder") / "tiny")
