"""Our conversion agrees with the ncnn runtime itself, running the very same published files.

``ncnn`` (the reference implementation of the format, a dev dependency) runs the ``.param`` /
``.bin`` files in fp32 on the CPU; our side is the converted PyTorch module served by
:class:`RealESRGANUpscaler`. Both read the same real photograph (``chelsea`` downscaled to
48x32). An independent rebuild reached 58.9 dB; a wrong tensor anywhere falls far below 40.
"""

from __future__ import annotations

from pathlib import Path

import ncnn
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional

from model.upscalers.base import UpscaleOptions
from model.upscalers.realesrgan import RealESRGANUpscaler
from model.upscalers.realesrgan.upscaler import image_to_tensor

from .conftest import photo, psnr

WIDTH, HEIGHT = 48, 32
MIN_PSNR_DB = 40.0


def float_output(upscaler: RealESRGANUpscaler, image: Image.Image, scale: int) -> np.ndarray:
    """Our network's output before rounding, with the graph's final resize, as ``(3, H, W)``."""
    with torch.no_grad():
        output = upscaler.net(image_to_tensor(image))
        resize = upscaler.resize_for(scale)
        if resize is not None:
            size = (image.height * scale, image.width * scale)
            output = functional.interpolate(output, size=size, mode=resize.mode)
    result: np.ndarray = output[0].numpy()
    return result


def run_ncnn(models_dir: Path, stem: str, rgb: np.ndarray) -> np.ndarray:
    """The ncnn network ``stem`` on an ``(H, W, 3)`` uint8 RGB image: ``(3, H*s, W*s)`` floats."""
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.use_fp16_packed = False
    net.opt.use_fp16_storage = False
    net.opt.use_fp16_arithmetic = False
    net.opt.num_threads = 1
    assert net.load_param(str(models_dir / f"{stem}.param")) == 0
    assert net.load_model(str(models_dir / f"{stem}.bin")) == 0
    height, width = rgb.shape[:2]
    # From uint8 pixels then scaled by 1/255: a Mat built straight from floats did not agree.
    image = ncnn.Mat.from_pixels(
        np.ascontiguousarray(rgb), ncnn.Mat.PixelType.PIXEL_RGB, width, height
    )
    image.substract_mean_normalize([], [1 / 255.0] * 3)
    extractor = net.create_extractor()
    extractor.input("data", image)
    status, output = extractor.extract("output")
    assert status == 0
    return np.array(output)


@pytest.mark.parametrize(
    ("model", "stem", "scale"),
    [
        ("realesrgan-x4plus", "realesrgan-x4plus", 4),
        ("realesr-animevideov3", "realesr-animevideov3-x4", 4),
        ("realesr-animevideov3", "realesr-animevideov3-x2", 2),
        ("realesr-animevideov3", "realesr-animevideov3-x3", 3),
    ],
)
def test_converted_model_agrees_with_ncnn_on_a_photo(
    request: pytest.FixtureRequest, models_dir: Path, model: str, stem: str, scale: int
) -> None:
    upscaler: RealESRGANUpscaler = request.getfixturevalue(
        "x4plus" if model == "realesrgan-x4plus" else "animevideo"
    )
    image = photo(WIDTH, HEIGHT)
    reference = run_ncnn(models_dir, stem, np.asarray(image))
    assert reference.shape == (3, HEIGHT * scale, WIDTH * scale)
    expected = np.clip(reference, 0, 1).transpose(1, 2, 0)

    # The network itself, in floats: any misplaced tensor shows here first.
    floats = np.clip(float_output(upscaler, image, scale), 0, 1).transpose(1, 2, 0)
    float_figure = psnr(expected, floats)
    # What is served: the uint8 image (8-bit rounding alone bounds this near 58.9 dB).
    ours = upscaler.upscale(image, UpscaleOptions(scale=scale)).image
    assert ours.size == (WIDTH * scale, HEIGHT * scale)
    figure = psnr(expected, np.asarray(ours) / 255.0)
    print(f"\n{stem}: PSNR(ncnn, ours) = {float_figure:.1f} dB in float, {figure:.1f} dB served")
    assert float_figure >= MIN_PSNR_DB
    assert figure >= MIN_PSNR_DB
    # ... and after rounding to 8 bits the two differ by at most one level anywhere.
    difference = np.abs(np.asarray(ours).astype(int) - np.round(expected * 255).astype(int))
    assert difference.max() <= 1


def test_the_agreement_test_can_fail(models_dir: Path, animevideo: RealESRGANUpscaler) -> None:
    """One wrong layer (the last conv's bias nudged by 0.02) is caught by the same measure."""
    image = photo(WIDTH, HEIGHT)
    reference = np.clip(run_ncnn(models_dir, "realesr-animevideov3-x4", np.asarray(image)), 0, 1)
    last = animevideo.net.body[-1]
    assert isinstance(last, nn.Conv2d) and last.bias is not None
    bias = last.bias
    bias.data += 0.02
    try:
        ours = animevideo.upscale(image, UpscaleOptions(scale=4)).image
    finally:
        bias.data -= 0.02
    assert psnr(reference.transpose(1, 2, 0), np.asarray(ours) / 255.0) < MIN_PSNR_DB
