"""Tests of the Real-ESRGAN degradation model (model/training/degradations.py) on small generated
images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from model.training.degradations import (
    FIRST_ORDER_DEFAULTS,
    MAX_KERNEL_SIZE,
    SECOND_ORDER_DEFAULTS,
    BlurKernelConfig,
    DegradationOrderConfig,
    RealESRGANDegradation,
    RealESRGANDegradationConfig,
    degrade_image,
    filter2d,
    gaussian_kernel,
    gaussian_noise,
    generalized_gaussian_kernel,
    jpeg_pillow,
    jpeg_quantisation_tables,
    jpeg_torch,
    plateau_kernel,
    poisson_noise,
    pulse_kernel,
    sample_blur_kernels,
    sample_final_sinc_kernels,
    sinc_kernel,
)


def _smooth_image(batch: int = 2, size: int = 64) -> torch.Tensor:
    """Gradients with a slow sine: little high-frequency energy, no 8x8 structure."""
    axis = torch.linspace(0.0, 1.0, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    image = torch.stack((xx, yy, 0.5 * (xx + yy))) * 0.8 + 0.1
    image = image + 0.05 * torch.sin(6.0 * xx + 4.0 * yy)
    return image.clamp(0, 1)[None].repeat(batch, 1, 1, 1)


def _textured_image(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator)


def _high_frequency_energy(images: torch.Tensor) -> float:
    """Mean squared response to the discrete Laplacian."""
    laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    channels = images.shape[1]
    weight = laplacian.expand(channels, 1, 3, 3).to(images.dtype)
    return float(torch.nn.functional.conv2d(images, weight, groups=channels).pow(2).mean())


def _blockiness(images: torch.Tensor) -> float:
    """Mean absolute jump across 8x8 block borders over the mean jump inside blocks."""
    diff = (images[..., :, 1:] - images[..., :, :-1]).abs()
    columns = torch.arange(diff.shape[-1])
    at_border = (columns % 8) == 7
    return float(diff[..., at_border].mean() / diff[..., ~at_border].mean())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- published defaults ----------------------------------------------------------------------


def test_defaults_are_real_esrgans_published_options() -> None:
    config = RealESRGANDegradationConfig()
    first, second = config.first, config.second
    assert first.blur.kernel_list == (
        "iso",
        "aniso",
        "generalized_iso",
        "generalized_aniso",
        "plateau_iso",
        "plateau_aniso",
    )
    assert first.blur.kernel_prob == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert first.blur.sigma_range == (0.2, 3.0)
    assert second.blur.sigma_range == (0.2, 1.5)
    assert first.blur.betag_range == second.blur.betag_range == (0.5, 4.0)
    assert first.blur.betap_range == second.blur.betap_range == (1.0, 2.0)
    assert first.blur.sinc_prob == second.blur.sinc_prob == 0.1
    assert first.blur.kernel_sizes == (7, 9, 11, 13, 15, 17, 19, 21)
    assert (first.resize_prob, first.resize_range) == ((0.2, 0.7, 0.1), (0.15, 1.5))
    assert (second.resize_prob, second.resize_range) == ((0.3, 0.4, 0.3), (0.3, 1.2))
    assert (first.noise_range, second.noise_range) == ((1.0, 30.0), (1.0, 25.0))
    assert (first.poisson_scale_range, second.poisson_scale_range) == ((0.05, 3.0), (0.05, 2.5))
    assert first.gaussian_noise_prob == second.gaussian_noise_prob == 0.5
    assert first.gray_noise_prob == second.gray_noise_prob == 0.4
    assert first.jpeg_range == second.jpeg_range == (30.0, 95.0)
    assert (config.second_blur_prob, config.final_sinc_prob) == (0.8, 0.8)
    assert config.scale == 4
    assert config.first is FIRST_ORDER_DEFAULTS and config.second is SECOND_ORDER_DEFAULTS


@pytest.mark.parametrize(
    "build",
    [
        lambda: BlurKernelConfig(kernel_prob=(1.0,)),
        lambda: BlurKernelConfig(kernel_sizes=(8,)),
        lambda: BlurKernelConfig(sigma_range=(3.0, 0.2)),
        lambda: BlurKernelConfig(sinc_prob=1.5),
        lambda: DegradationOrderConfig(resize_range=(1.1, 1.5)),
        lambda: DegradationOrderConfig(jpeg_range=(30.0, 120.0)),
        lambda: RealESRGANDegradationConfig(scale=0),
        lambda: RealESRGANDegradationConfig(jpeg_backend="libjpeg"),  # type: ignore[arg-type]
    ],
)
def test_invalid_configurations_are_rejected(build: object) -> None:
    with pytest.raises(ValueError):
        build()  # type: ignore[operator]


def test_check_inputs_rejects_bad_tensors() -> None:
    degradation = RealESRGANDegradation()
    with pytest.raises(ValueError, match="B, 3, H, W"):
        degradation(torch.rand(3, 16, 16), _gen(0))
    with pytest.raises(ValueError, match="floating-point"):
        degradation(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), _gen(0))


# --- kernels --------------------------------------------------------------------------------


def test_isotropic_gaussian_matches_the_closed_form() -> None:
    sigma = torch.tensor([1.3], dtype=torch.float64)
    kernel = gaussian_kernel(9, sigma, sigma, torch.zeros(1, dtype=torch.float64))[0]
    axis = torch.arange(9, dtype=torch.float64) - 4
    profile = torch.exp(-(axis**2) / (2 * 1.3**2))
    expected = torch.outer(profile, profile)
    torch.testing.assert_close(kernel, expected / expected.sum())


def test_anisotropic_rotation_turns_the_kernel() -> None:
    sx, sy = torch.tensor([3.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    flat = gaussian_kernel(15, sx, sy, torch.zeros(1, dtype=torch.float64))[0]
    turned = gaussian_kernel(15, sx, sy, torch.full((1,), math.pi / 2, dtype=torch.float64))[0]
    # Wide along x at theta 0; a quarter turn makes it wide along y.
    assert flat[7].sum() > 3 * flat[:, 7].sum()
    torch.testing.assert_close(turned, flat.T)


def test_generalized_and_plateau_shapes() -> None:
    one = torch.ones(1, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    sigma = 2.0 * one
    gaussian = gaussian_kernel(21, sigma, sigma, zero)[0]
    torch.testing.assert_close(
        generalized_gaussian_kernel(21, sigma, sigma, zero, one)[0], gaussian
    )
    heavy = generalized_gaussian_kernel(21, sigma, sigma, zero, 0.5 * one)[0]
    boxy = generalized_gaussian_kernel(21, sigma, sigma, zero, 4.0 * one)[0]
    # beta < 1: heavier tails; beta > 1: flatter top and sharper fall-off.
    assert heavy[10, 0] / heavy[10, 10] > gaussian[10, 0] / gaussian[10, 10]
    assert boxy[10, 11] / boxy[10, 10] > gaussian[10, 11] / gaussian[10, 10]
    plateau = plateau_kernel(21, sigma, sigma, zero, 2.0 * one)[0]
    assert plateau[10, 11] / plateau[10, 10] > gaussian[10, 11] / gaussian[10, 10]
    assert float(plateau.min()) > 0 and float(plateau.sum()) == pytest.approx(1.0)


def test_sinc_kernel_is_a_ringing_low_pass() -> None:
    kernel = sinc_kernel(21, torch.tensor([math.pi / 3], dtype=torch.float64))[0]
    assert float(kernel.sum()) == pytest.approx(1.0)
    assert float(kernel.min()) < 0  # negative lobes: ringing
    assert int(kernel.argmax()) == 10 * 21 + 10
    torch.testing.assert_close(kernel, kernel.T)
    torch.testing.assert_close(kernel, kernel.flip(0))


def test_sampled_kernels_sizes_and_sinc_rate() -> None:
    kernels = sample_blur_kernels(BlurKernelConfig(), 1500, _gen(1))
    assert kernels.shape == (1500, MAX_KERNEL_SIZE, MAX_KERNEL_SIZE)
    torch.testing.assert_close(kernels.sum(dim=(1, 2)), torch.ones(1500, dtype=torch.float64))
    # Only sinc kernels have negative taps; they are drawn with probability 0.1.
    sinc_rate = float((kernels.amin(dim=(1, 2)) < -1e-12).double().mean())
    assert 0.07 < sinc_rate < 0.13
    # Kernel sizes 7..21 zero-padded to 21: some kernels have an empty outer ring.
    ring = kernels[:, 0, :].abs().sum(dim=1)
    assert 0.6 < float((ring == 0).double().mean()) < 0.95
    only_iso = BlurKernelConfig(kernel_list=("iso",), kernel_prob=(1.0,), sinc_prob=0.0)
    iso = sample_blur_kernels(only_iso, 50, _gen(2))
    torch.testing.assert_close(iso, iso.transpose(1, 2))
    assert float(iso.min()) >= 0


def test_final_sinc_kernels_are_sinc_or_identity() -> None:
    kernels = sample_final_sinc_kernels(RealESRGANDegradationConfig(), 400, _gen(3))
    identity = (kernels == pulse_kernel(400)).all(dim=(1, 2))
    assert 0.13 < float(identity.double().mean()) < 0.27  # 1 - final_sinc_prob = 0.2


def test_same_seed_same_kernels() -> None:
    a = sample_blur_kernels(BlurKernelConfig(), 16, _gen(7))
    b = sample_blur_kernels(BlurKernelConfig(), 16, _gen(7))
    c = sample_blur_kernels(BlurKernelConfig(), 16, _gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- individual stages ----------------------------------------------------------------------


def test_blur_lowers_high_frequency_energy() -> None:
    images = _textured_image()
    sigma = torch.full((2,), 1.5, dtype=torch.float64)
    kernels = gaussian_kernel(MAX_KERNEL_SIZE, sigma, sigma, torch.zeros(2, dtype=torch.float64))
    blurred = filter2d(images, kernels)
    assert blurred.shape == images.shape
    assert _high_frequency_energy(blurred) < 0.1 * _high_frequency_energy(images)
    # The identity kernel leaves the images alone.
    torch.testing.assert_close(filter2d(images, pulse_kernel(2)), images)


def test_gaussian_noise_raises_high_frequency_energy_at_the_drawn_level() -> None:
    images = _smooth_image()
    sigma = torch.tensor([10.0, 20.0]) / 255.0
    noise = gaussian_noise(images, sigma, torch.tensor([False, True]), _gen(0))
    noisy = images + noise
    assert _high_frequency_energy(noisy) > 20 * _high_frequency_energy(images)
    assert float(noise[0].std()) == pytest.approx(10 / 255, rel=0.05)
    assert float(noise[1].std()) == pytest.approx(20 / 255, rel=0.05)
    # Gray noise is the same in every channel, colour noise is not.
    torch.testing.assert_close(noise[1, 0], noise[1, 2])
    assert not torch.allclose(noise[0, 0], noise[0, 2])


def test_poisson_noise_grows_with_intensity() -> None:
    dark = torch.full((1, 3, 32, 32), 0.1)
    bright = torch.full((1, 3, 32, 32), 0.8)
    images = torch.cat((dark, bright))
    noise = poisson_noise(images, torch.tensor([1.0, 1.0]), torch.tensor([False, False]), _gen(0))
    assert float(noise[1].std()) > 1.5 * float(noise[0].std()) > 0
    assert _high_frequency_energy(images + noise) > 10 * _high_frequency_energy(images) + 1e-6


def test_jpeg_tables_follow_the_libjpeg_scaling() -> None:
    luma, chroma = jpeg_quantisation_tables(torch.tensor([50.0, 100.0, 10.0]))
    assert luma[0, 0, 0] == 16 and luma[0, 7, 7] == 99 and chroma[0, 0, 0] == 17
    assert bool((luma[1] == 1).all()) and bool((chroma[1] == 1).all())
    assert luma[2, 0, 0] == math.floor((16 * 500 + 50) / 100)


def test_jpeg_raises_blockiness_and_matches_libjpeg() -> None:
    images = _smooth_image(batch=2, size=64)
    quality = torch.tensor([20.0, 20.0])
    ours = jpeg_torch(images, quality)
    reference = jpeg_pillow(images, quality)
    assert ours.shape == images.shape
    assert _blockiness(ours) > 1.5 * _blockiness(images)
    psnr_vs_libjpeg = -10 * math.log10(float((ours - reference).pow(2).mean()))
    assert psnr_vs_libjpeg > 35.0
    # Lower quality, larger error; odd sizes are padded and cropped back.
    odd = _smooth_image(batch=1, size=37)
    errors = [
        float((jpeg_torch(odd, torch.tensor([q])) - odd).pow(2).mean()) for q in (90.0, 50.0, 10.0)
    ]
    assert errors[0] < errors[1] < errors[2]


# --- the whole model ------------------------------------------------------------------------


def test_same_seed_same_output_and_range() -> None:
    degradation = RealESRGANDegradation()
    hr = _textured_image(batch=3, size=64)
    first = degradation(hr, _gen(11))
    again = degradation(hr, _gen(11))
    other = degradation(hr, _gen(12))
    assert first.shape == (3, 3, 16, 16)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    torch.testing.assert_close(first * 255, torch.round(first * 255))  # 8-bit levels


def test_both_final_orders_and_the_pillow_backend_run() -> None:
    hr = _smooth_image(batch=2, size=64)
    resize_first = RealESRGANDegradation(RealESRGANDegradationConfig(final_resize_first_prob=1.0))
    jpeg_first = RealESRGANDegradation(RealESRGANDegradationConfig(final_resize_first_prob=0.0))
    a, b = resize_first(hr, _gen(5)), jpeg_first(hr, _gen(5))
    assert a.shape == b.shape == (2, 3, 16, 16)
    assert not torch.equal(a, b)
    pillow = RealESRGANDegradation(RealESRGANDegradationConfig(jpeg_backend="pillow"))
    c = pillow(hr, _gen(5))
    assert c.shape == (2, 3, 16, 16) and torch.equal(c, pillow(hr, _gen(5)))


def test_degradation_removes_detail_relative_to_bicubic() -> None:
    """On average the degraded LR is further from the clean image than a plain down-scale."""
    hr = _textured_image(batch=8, size=64, seed=3) * 0.5 + _smooth_image(batch=8) * 0.5
    lr = RealESRGANDegradation()(hr, _gen(0))
    clean = torch.nn.functional.interpolate(hr, size=(16, 16), mode="area")
    assert float((lr - clean).abs().mean()) > 0.01


def test_degrade_image_on_pil() -> None:
    image = Image.new("RGB", (66, 50), (120, 40, 200))
    a = degrade_image(image, seed=1)
    b = degrade_image(image, seed=1)
    assert a.size == (16, 12)
    assert np.array_equal(np.asarray(a), np.asarray(b))
