"""The worker's output encoding: PNG stays lossless in every mode, the faster settings cost no
size, WebP and JPEG stay near the pixels they were given."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from core.jobs import ImageFormat
from worker import imaging


def _photo_like(width: int = 160, height: int = 120, seed: int = 0) -> np.ndarray:
    """Smooth shading, edges and a little grain: what an upscaler writes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([200 * xx, 180 * yy, 120 + 100 * np.sin(6 * xx) * yy], axis=-1)
    base[height // 3 : height // 2, width // 4 : width // 2] = (30, 200, 90)  # a flat patch
    base = base + rng.normal(0, 2, base.shape)
    image: np.ndarray = np.clip(base, 0, 255).astype(np.uint8)
    return image


def _image(mode: str) -> Image.Image:
    rgb = Image.fromarray(_photo_like())
    if mode == "RGB":
        return rgb
    gray = rgb.convert("L")
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 160, dtype=np.uint8), (120, 1)))
    if mode == "L":
        return gray
    image = (gray if mode == "LA" else rgb).convert(mode)
    image.putalpha(alpha)
    return image


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_png_output_is_lossless(mode: str) -> None:
    image = _image(mode)
    data = imaging.encode(image, ImageFormat.PNG)
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == "PNG"
        assert decoded.mode == mode
        assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_png_settings_are_the_fast_ones_and_cost_no_size() -> None:
    options = imaging.save_options(ImageFormat.PNG)
    assert options["compress_type"] == zlib.Z_RLE and not options.get("optimize")
    image = Image.fromarray(_photo_like(512, 384))
    fast = len(imaging.encode(image, ImageFormat.PNG))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # Pillow's default: level 6, default strategy
    assert fast <= 1.05 * len(buffer.getvalue())


@pytest.mark.parametrize(
    ("output_format", "min_psnr"), [(ImageFormat.WEBP, 35.0), (ImageFormat.JPEG, 38.0)]
)
def test_lossy_outputs_stay_close_to_the_pixels(
    output_format: ImageFormat, min_psnr: float
) -> None:
    pixels = _photo_like()
    data = imaging.encode(Image.fromarray(pixels), output_format)
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == output_format.value.upper()
        assert decoded.size == (160, 120)
        error = np.asarray(decoded.convert("RGB"), dtype=np.float64) - pixels
    psnr = 10 * np.log10(255.0**2 / np.mean(error**2))
    assert psnr > min_psnr
