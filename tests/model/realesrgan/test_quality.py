"""Super-resolution quality on a real photograph: the trained x4plus weights, not noise.

``chelsea`` (451x300, cropped to 448x300) is downscaled by 4 with bicubic and brought back x4
by Real-ESRGAN x4plus and by bicubic. Real-ESRGAN (Wang et al. 2021) is a GAN trained for blind,
real-world degradations, not for PSNR: on a clean bicubic input it trails bicubic by a few dB in
PSNR (fine fur is redrawn, not reproduced), while being far sharper. So the checks are PSNR within
3.5 dB of bicubic and far above what random weights give (12-16 dB), and edge energy much closer
to the original's than bicubic's blur. The output is written to ``$REALESRGAN_QUALITY_DIR`` (or a
temporary folder) to be looked at.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.evaluation.photos import load_photo
from model.upscalers.base import UpscaleOptions
from model.upscalers.realesrgan import RealESRGANUpscaler

from .conftest import psnr

BICUBIC_MARGIN_DB = 3.5
"""Measured gap on this photo: 2.8 dB (27.4 vs 30.2 dB)."""
NOISE_CEILING_DB = 24.0


def edge_energy(image: Image.Image) -> float:
    """Mean absolute difference between neighbouring pixels (luma): how much detail there is."""
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    return float(np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean())


def test_x4plus_restores_a_photo_downscaled_by_four(
    x4plus: RealESRGANUpscaler, tmp_path_factory: pytest.TempPathFactory
) -> None:
    original = load_photo("chelsea").crop((0, 0, 448, 300))
    small = original.resize((112, 75), Image.Resampling.BICUBIC)
    bicubic = small.resize(original.size, Image.Resampling.BICUBIC)
    restored = x4plus.upscale(small, UpscaleOptions(scale=4)).image
    assert restored.size == original.size

    reference = np.asarray(original)
    ours, baseline = (
        psnr(reference, np.asarray(restored), 255.0),
        psnr(reference, np.asarray(bicubic), 255.0),
    )
    sharp, blurred, truth = edge_energy(restored), edge_energy(bicubic), edge_energy(original)
    folder = Path(os.environ.get("REALESRGAN_QUALITY_DIR") or tmp_path_factory.mktemp("quality"))
    folder.mkdir(parents=True, exist_ok=True)
    restored.save(folder / "chelsea_x4plus.png")
    bicubic.save(folder / "chelsea_bicubic.png")
    print(
        f"\nchelsea /4 -> x4: Real-ESRGAN x4plus {ours:.2f} dB, bicubic {baseline:.2f} dB; "
        f"edge energy {sharp:.2f} vs bicubic {blurred:.2f} vs original {truth:.2f}; "
        f"images in {folder}"
    )
    assert ours >= baseline - BICUBIC_MARGIN_DB
    assert ours >= NOISE_CEILING_DB
    assert sharp >= 1.5 * blurred and sharp <= 1.1 * truth
