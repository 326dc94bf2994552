"""Real-ESRGAN test fixtures: the published models converted once per session, a real photo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.evaluation.photos import load_photo
from model.upscalers.realesrgan import RealESRGANUpscaler
from model.upscalers.realesrgan.catalogue import package_models_dir


def photo(width: int, height: int) -> Image.Image:
    """scikit-image's ``chelsea`` (a 451x300 photograph of a cat) resized with a box filter."""
    return load_photo("chelsea").resize((width, height), Image.Resampling.BOX)


def psnr(reference: np.ndarray, test: np.ndarray, peak: float = 1.0) -> float:
    """PSNR in dB of two arrays on the same scale (``peak`` = the largest value)."""
    error = np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(peak**2 / error))


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return package_models_dir()


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One conversion cache for the session: each published model is converted once."""
    return tmp_path_factory.mktemp("realesrgan-cache")


@pytest.fixture(scope="session")
def x4plus(cache_root: Path) -> RealESRGANUpscaler:
    return RealESRGANUpscaler.from_catalogue("realesrgan-x4plus", cache_root=cache_root)


@pytest.fixture(scope="session")
def animevideo(cache_root: Path) -> RealESRGANUpscaler:
    return RealESRGANUpscaler.from_catalogue("realesr-animevideov3", cache_root=cache_root)
