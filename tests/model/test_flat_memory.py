"""Flat memory (:mod:`model.pipeline.diffusion`): the full-resolution work is streamed region by
region into an output allocated once, with the whole-image results, and a job's peak memory above
the loaded model grows far slower than its output.

The peaks are measured by ``bench/bench_memory.py`` in fresh processes (a peak cannot carry over
from another case or test), at 1024² and 2048²: the tiled VAE alone in `make test`, the whole
job in `make test-slow`; both sizes tiled and streamed (a 512² output is decoded
untiled, in one forward, and costs more than 1024², so it would hide any growth). The bounds are
generous: four times the pixels must cost less than twice the memory, and less than 20 bytes per
added output pixel; measured 1.5x and about 7 bytes, of which 4 are the output itself (a PIL RGB
image). The code before streaming needed some 160 bytes per added pixel in the same measurement.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from model.pipeline.color import apply_color_fix
from model.pipeline.diffusion import OUTPUT_REGION, _Output, _Upsampled, stream_output

ROOT = Path(__file__).resolve().parents[2]


def _low_res(height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, height, width, generator=generator) * 2 - 1


@pytest.mark.parametrize(
    ("height", "width", "scale", "padded"),
    [
        (37, 50, 4, (192, 256)),
        (150, 200, 4, (640, 832)),
        (3, 2, 2, (16, 16)),
        (70, 9, 2, (144, 32)),
    ],
    ids=["reflect", "several-regions", "replicate", "narrow"],
)
def test_upsampled_regions_equal_the_whole_image_upsampling(
    height: int, width: int, scale: int, padded: tuple[int, int]
) -> None:
    low_res = _low_res(height, width)
    out_h, out_w = height * scale, width * scale
    whole = F.interpolate(low_res, size=(out_h, out_w), mode="bicubic", align_corners=False)
    whole = whole.clamp(-1, 1)
    pad_h, pad_w = padded[0] - out_h, padded[1] - out_w
    mode = "reflect" if pad_h < out_h and pad_w < out_w else "replicate"
    expected = F.pad(whole, (0, pad_w, 0, pad_h), mode=mode)
    upsampled = _Upsampled(low_res, scale, *padded)
    assert torch.equal(upsampled.source((torch.float32,)).whole(), expected)
    rows, cols = slice(padded[0] // 3, padded[0]), slice(1, padded[1] - 1)
    assert torch.equal(upsampled.region(rows, cols), expected[..., rows, cols])


@pytest.mark.parametrize("color_fix", ["none", "adain", "wavelet"])
def test_streamed_output_equals_the_whole_image_colour_fix(color_fix: str) -> None:
    # 600 x 700: four regions, with borders inside the wavelet's reach
    low_res = _low_res(150, 175)
    upsampled = _Upsampled(low_res, 4, 640, 704)
    generator = torch.Generator().manual_seed(1)
    decoded = torch.randn(1, 3, 640, 704, generator=generator).clamp(-1.5, 1.5)
    assert OUTPUT_REGION < 600
    reference = upsampled.source((torch.float32,)).whole()[..., :600, :700]
    whole = apply_color_fix(decoded[..., :600, :700], reference, color_fix).clamp(-1, 1)
    whole = (whole + 1) / 2

    tensor = _Output(600, 700, "pt")
    stream_output(decoded, upsampled, color_fix, tensor)
    result = tensor.result()
    assert isinstance(result, torch.Tensor) and result.shape == (1, 3, 600, 700)
    torch.testing.assert_close(result, whole, rtol=0, atol=1e-5)

    image = _Output(600, 700, "pil")
    stream_output(decoded, upsampled, color_fix, image)
    images = image.result()
    assert isinstance(images, list) and images[0].size == (700, 600)
    expected = (whole[0].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    difference = np.abs(np.asarray(images[0]).astype(int) - expected.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3  # rounding ties at most


def _assert_grows_far_slower_than_the_output(*, vae_only: bool) -> None:
    sys.path.insert(0, str(ROOT))
    from bench.bench_memory import measure

    # 256-px tiles: the tiny model's fastest (25 and 121 tiles here)
    small = measure(1024, tile=256, vae_only=vae_only)
    large = measure(2048, tile=256, vae_only=vae_only)
    assert small["peak_bytes"] > 0
    assert large["peak_bytes"] < 2.0 * small["peak_bytes"], (small, large)
    per_pixel = (large["peak_bytes"] - small["peak_bytes"]) / (2048**2 - 1024**2)
    assert per_pixel < 20, (small, large)


# The part whose buffers grew with the output's area: about 35 s on a quiet 2-core machine,
# several times that beside other work (hence the longer timeout).
@pytest.mark.timeout(900)
def test_tiled_vae_memory_grows_far_slower_than_the_output() -> None:
    _assert_grows_far_slower_than_the_output(vae_only=True)


# The whole job (one step): about 60 s quiet, over 300 s beside two CPU-bound processes.
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_job_memory_grows_far_slower_than_the_output() -> None:
    _assert_grows_far_slower_than_the_output(vae_only=False)
