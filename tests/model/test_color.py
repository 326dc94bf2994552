"""Colour fixes against an independent NumPy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.pipeline.color import (
    adain_color_fix,
    apply_color_fix,
    wavelet_color_fix,
    wavelet_decomposition,
)

KERNEL = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float64) / 16


def reference_blur(channel: np.ndarray, radius: int) -> np.ndarray:
    padded = np.pad(channel, radius, mode="edge")
    height, width = channel.shape
    out = np.zeros_like(channel)
    for dy in range(3):
        for dx in range(3):
            out += (
                KERNEL[dy, dx]
                * padded[dy * radius : dy * radius + height, dx * radius : dx * radius + width]
            )
    return out


def reference_wavelet(image: np.ndarray, reference: np.ndarray, levels: int = 5) -> np.ndarray:
    out = np.zeros_like(image)
    for c in range(image.shape[0]):
        low_image, low_reference = image[c], reference[c]
        for level in range(levels):
            low_image = reference_blur(low_image, 2**level)
            low_reference = reference_blur(low_reference, 2**level)
        out[c] = image[c] - low_image + low_reference  # high(image) + low(reference)
    return out


def reference_adain(image: np.ndarray, reference: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    out = np.empty_like(image)
    for c in range(image.shape[0]):
        std_i = np.sqrt(image[c].var(ddof=1) + eps)
        std_r = np.sqrt(reference[c].var(ddof=1) + eps)
        out[c] = (image[c] - image[c].mean()) / std_i * std_r + reference[c].mean()
    return out


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 37, 53, generator=generator, dtype=torch.float64)
    reference = torch.rand(1, 3, 37, 53, generator=generator, dtype=torch.float64) * 0.5 + 0.3
    return image, reference


def test_adain_matches_reference(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    image, reference = pair
    ours = adain_color_fix(image, reference)[0].numpy()
    np.testing.assert_allclose(
        ours, reference_adain(image[0].numpy(), reference[0].numpy()), atol=1e-10
    )
    for c in range(3):
        assert ours[c].mean() == pytest.approx(reference[0, c].mean().item(), abs=1e-9)


def test_wavelet_matches_reference(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    image, reference = pair
    ours = wavelet_color_fix(image, reference)[0].numpy()
    np.testing.assert_allclose(
        ours, reference_wavelet(image[0].numpy(), reference[0].numpy()), atol=1e-10
    )


def test_wavelet_bands_sum_to_the_image(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    image, _ = pair
    high, low = wavelet_decomposition(image)
    torch.testing.assert_close(high + low, image)
    torch.testing.assert_close(wavelet_color_fix(image, image), image)


def test_wavelet_works_on_images_smaller_than_the_kernel_reach() -> None:
    image = torch.rand(1, 3, 4, 6)
    assert wavelet_color_fix(image, image.flip(-1)).shape == image.shape


def test_apply_color_fix_modes(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    image, reference = pair
    image32, reference32 = image.float(), reference.float()
    assert apply_color_fix(image32, reference32, "none") is image32
    torch.testing.assert_close(
        apply_color_fix(image32, reference32, "adain"), adain_color_fix(image32, reference32)
    )
    torch.testing.assert_close(
        apply_color_fix(image32, reference32, "wavelet"), wavelet_color_fix(image32, reference32)
    )
    with pytest.raises(ValueError):
        apply_color_fix(image32, reference32, "histogram")
    with pytest.raises(ValueError):
        apply_color_fix(image32, reference32[..., :-1], "adain")
