"""The Real-ESRGAN second-order degradation model, batched in torch (DESIGN 1.4).

Real-ESRGAN: Wang, Xie, Dong, Shan, "Real-ESRGAN: Training Real-World Blind Super-Resolution
with Pure Synthetic Data", ICCV Workshops 2021, Sec. 3 (Eq. 1-4, Fig. 2). SpaSemSR builds its
LR-HR training pairs with this model and degrades its 3,000 DIV2K-val test patches with it
(DESIGN 1.4-1.5).

One degradation order is ``blur -> random resize -> Gaussian or Poisson noise -> JPEG``; the
model applies it twice (the second blur only with probability 0.8) and then a final stage that
resizes to the target LR size and applies a 2-D sinc filter (probability 0.8) and JPEG, in one
of two random orders.

The default parameters (:data:`FIRST_ORDER_DEFAULTS`, :data:`SECOND_ORDER_DEFAULTS`,
:class:`RealESRGANDegradationConfig`) are the ones Real-ESRGAN publishes in its x4 training
options (``train_realesrgan_x4plus.yml``: kernel list and probabilities, sigma / beta ranges,
sinc probability, resize / noise / JPEG ranges of both orders, second-blur probability 0.8,
final-sinc probability 0.8), with kernel sizes drawn from the odd sizes 7..21 and padded to 21
as in its data set code.

Everything random is drawn from a caller-supplied :class:`torch.Generator`, so the same seed on
the same device gives the same output. Per-sample quantities (kernels, noise type and level,
JPEG quality, whether the second blur and the final sinc apply) are drawn per image; the resize
factors, resize modes and the order of the final stage change the tensor shape and are
therefore drawn once per batch, as Real-ESRGAN does.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image

KernelType = Literal[
    "iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"
]
ResizeMode = Literal["area", "bilinear", "bicubic"]
JpegBackend = Literal["torch", "pillow"]

KERNEL_TYPES: tuple[KernelType, ...] = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
KERNEL_SIZES: tuple[int, ...] = tuple(2 * v + 1 for v in range(3, 11))
"""Real-ESRGAN draws blur and sinc kernel sizes from the odd sizes 7..21."""
MAX_KERNEL_SIZE = 21
"""Real-ESRGAN zero-pads every kernel to 21 x 21 so that a batch shares one shape."""


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def _check_range(name: str, value: tuple[float, float], *, low: float) -> None:
    if not low <= value[0] <= value[1]:
        raise ValueError(f"{name} must be an ordered pair >= {low}, got {value}")


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True, kw_only=True)
class BlurKernelConfig:
    """How one blur kernel is drawn (Real-ESRGAN Sec. 3.1; its ``kernel_list``, ``blur_sigma``)."""

    kernel_list: tuple[KernelType, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sigma_range: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    """Generalised-Gaussian shape; beta < 1 is drawn half of the time, beta > 1 the other half."""
    betap_range: tuple[float, float] = (1.0, 2.0)
    """Shape of the plateau kernel, drawn like ``betag_range``."""
    rotation_range: tuple[float, float] = (-math.pi, math.pi)
    sinc_prob: float = 0.1
    """Probability that the blur is a 2-D sinc (ringing, overshoot) instead of a Gaussian."""
    kernel_sizes: tuple[int, ...] = KERNEL_SIZES

    def __post_init__(self) -> None:
        if len(self.kernel_list) != len(self.kernel_prob) or not self.kernel_list:
            raise ValueError("kernel_list and kernel_prob must be non-empty and of equal length")
        if any(p < 0 for p in self.kernel_prob) or sum(self.kernel_prob) <= 0:
            raise ValueError(
                f"kernel_prob must be non-negative with a positive sum: {self.kernel_prob}"
            )
        unknown = set(self.kernel_list) - set(KERNEL_TYPES)
        if unknown:
            raise ValueError(f"unknown kernel types {sorted(unknown)}; known: {KERNEL_TYPES}")
        if any(k % 2 == 0 or k < 1 or k > MAX_KERNEL_SIZE for k in self.kernel_sizes):
            raise ValueError(
                f"kernel sizes must be odd and <= {MAX_KERNEL_SIZE}: {self.kernel_sizes}"
            )
        _check_range("sigma_range", self.sigma_range, low=1e-6)
        _check_range("betag_range", self.betag_range, low=1e-6)
        _check_range("betap_range", self.betap_range, low=1e-6)
        _check_probability("sinc_prob", self.sinc_prob)


@dataclass(frozen=True, kw_only=True)
class DegradationOrderConfig:
    """One order ``blur -> resize -> noise -> JPEG`` (Real-ESRGAN Eq. 4, one of its two passes)."""

    blur: BlurKernelConfig = field(default_factory=BlurKernelConfig)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    """Probabilities of (up, down, keep)."""
    resize_range: tuple[float, float] = (0.15, 1.5)
    """Down-scaling draws from ``[low, 1]``, up-scaling from ``[1, high]``."""
    gaussian_noise_prob: float = 0.5
    """Otherwise Poisson noise."""
    noise_range: tuple[float, float] = (1.0, 30.0)
    """Gaussian noise sigma, in 8-bit levels."""
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    """Probability that the noise is the same in all three channels."""
    jpeg_range: tuple[float, float] = (30.0, 95.0)

    def __post_init__(self) -> None:
        if any(p < 0 for p in self.resize_prob) or sum(self.resize_prob) <= 0:
            raise ValueError(
                f"resize_prob must be non-negative with a positive sum: {self.resize_prob}"
            )
        _check_range("resize_range", self.resize_range, low=1e-3)
        if not self.resize_range[0] <= 1.0 <= self.resize_range[1]:
            raise ValueError(f"resize_range must contain 1: {self.resize_range}")
        _check_range("noise_range", self.noise_range, low=0.0)
        _check_range("poisson_scale_range", self.poisson_scale_range, low=0.0)
        _check_range("jpeg_range", self.jpeg_range, low=1.0)
        if self.jpeg_range[1] > 100:
            raise ValueError(f"JPEG quality is at most 100: {self.jpeg_range}")
        _check_probability("gaussian_noise_prob", self.gaussian_noise_prob)
        _check_probability("gray_noise_prob", self.gray_noise_prob)


FIRST_ORDER_DEFAULTS = DegradationOrderConfig()
"""Real-ESRGAN's first order: sigma 0.2-3, resize (0.2, 0.7, 0.1) in [0.15, 1.5], noise 1-30,
Poisson 0.05-3, gray 0.4, JPEG 30-95."""

SECOND_ORDER_DEFAULTS = DegradationOrderConfig(
    blur=BlurKernelConfig(sigma_range=(0.2, 1.5)),
    resize_prob=(0.3, 0.4, 0.3),
    resize_range=(0.3, 1.2),
    noise_range=(1.0, 25.0),
    poisson_scale_range=(0.05, 2.5),
)
"""Real-ESRGAN's second order: sigma 0.2-1.5, resize (0.3, 0.4, 0.3) in [0.3, 1.2], noise 1-25,
Poisson 0.05-2.5, gray 0.4, JPEG 30-95."""


@dataclass(frozen=True, kw_only=True)
class RealESRGANDegradationConfig:
    """The whole second-order model with Real-ESRGAN's published x4 defaults."""

    scale: int = 4
    first: DegradationOrderConfig = FIRST_ORDER_DEFAULTS
    second: DegradationOrderConfig = SECOND_ORDER_DEFAULTS
    second_blur_prob: float = 0.8
    final_sinc_prob: float = 0.8
    final_sinc_omega_range: tuple[float, float] = (math.pi / 3, math.pi)
    final_kernel_sizes: tuple[int, ...] = KERNEL_SIZES
    resize_modes: tuple[ResizeMode, ...] = ("area", "bilinear", "bicubic")
    final_resize_first_prob: float = 0.5
    """Probability of ``resize -> sinc -> JPEG``; otherwise ``JPEG -> resize -> sinc``."""
    jpeg_backend: JpegBackend = "torch"

    def __post_init__(self) -> None:
        if self.scale < 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")
        _check_probability("second_blur_prob", self.second_blur_prob)
        _check_probability("final_sinc_prob", self.final_sinc_prob)
        _check_probability("final_resize_first_prob", self.final_resize_first_prob)
        _check_range("final_sinc_omega_range", self.final_sinc_omega_range, low=1e-6)
        if not self.resize_modes:
            raise ValueError("resize_modes must not be empty")
        if any(k % 2 == 0 or k > MAX_KERNEL_SIZE for k in self.final_kernel_sizes):
            raise ValueError(f"final kernel sizes must be odd and <= {MAX_KERNEL_SIZE}")
        if self.jpeg_backend not in ("torch", "pillow"):
            raise ValueError(f"jpeg_backend must be 'torch' or 'pillow', got {self.jpeg_backend!r}")


# ---------------------------------------------------------------------------------------------
# Random draws, all through one generator
# ---------------------------------------------------------------------------------------------


def _rand(generator: torch.Generator, n: int) -> torch.Tensor:
    """``n`` uniforms in [0, 1) on the generator's device, as float64 on the CPU.

    Drawing every parameter on the generator's own device and bringing it to the CPU keeps the
    sequence of draws (and so the output) a function of the seed alone.
    """
    values = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
    return values.cpu()


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * _rand(generator, n)


def _choice(generator: torch.Generator, n: int, probs: Sequence[float]) -> torch.Tensor:
    """Indices drawn from the categorical distribution ``probs`` (inverse CDF of one uniform)."""
    weights = torch.tensor(probs, dtype=torch.float64)
    cdf = torch.cumsum(weights / weights.sum(), 0)
    cdf[-1] = 1.0
    return torch.searchsorted(cdf, _rand(generator, n), right=True).clamp(max=len(probs) - 1)


def _split_beta(
    generator: torch.Generator, n: int, beta_range: tuple[float, float]
) -> torch.Tensor:
    """Real-ESRGAN's shape draw: half of the time below 1 (heavier tails), half above."""
    below = _uniform(generator, n, min(beta_range[0], 1.0), 1.0)
    above = _uniform(generator, n, 1.0, max(beta_range[1], 1.0))
    return torch.where(_rand(generator, n) < 0.5, below, above)


# ---------------------------------------------------------------------------------------------
# Kernels (batched: one parameter per batch item, all kernels on a common odd grid)
# ---------------------------------------------------------------------------------------------


def _grid(size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    half = (size - 1) / 2
    axis = torch.arange(size, dtype=dtype, device=device) - half
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    return xx, yy


def _support_mask(sizes: torch.Tensor, grid_size: int) -> torch.Tensor:
    """1 inside the centred ``sizes[i] x sizes[i]`` square of a ``grid_size`` grid, 0 outside.

    A kernel of size k zero-padded to the grid is the same as the grid kernel masked to k x k.
    """
    xx, yy = _grid(grid_size, torch.float64, sizes.device)
    half = ((sizes.to(torch.float64) - 1) / 2).view(-1, 1, 1)
    return ((xx.abs() <= half) & (yy.abs() <= half)).to(torch.float64)


def _normalise(kernels: torch.Tensor) -> torch.Tensor:
    return kernels / kernels.sum(dim=(-2, -1), keepdim=True)


def _quadratic_form(
    size: int, sigma_x: torch.Tensor, sigma_y: torch.Tensor, theta: torch.Tensor
) -> torch.Tensor:
    """``d^T Sigma^-1 d`` on the grid, with ``Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T``."""
    xx, yy = _grid(size, torch.float64, sigma_x.device)
    cos = torch.cos(theta).view(-1, 1, 1)
    sin = torch.sin(theta).view(-1, 1, 1)
    # Rotating the offsets by -theta into the kernel's principal axes diagonalises Sigma.
    u = cos * xx + sin * yy
    v = -sin * xx + cos * yy
    return (u / sigma_x.view(-1, 1, 1)) ** 2 + (v / sigma_y.view(-1, 1, 1)) ** 2


def generalized_gaussian_kernel(
    size: int,
    sigma_x: torch.Tensor,
    sigma_y: torch.Tensor,
    theta: torch.Tensor,
    beta: torch.Tensor | None = None,
) -> torch.Tensor:
    """``exp(-0.5 (d^T Sigma^-1 d)^beta)``, normalised (Real-ESRGAN Sec. 3.1); beta 1 is Gaussian.

    All parameters are 1-D tensors of the batch size; returns ``(B, size, size)`` float64.
    """
    q = _quadratic_form(size, sigma_x, sigma_y, theta)
    if beta is not None:
        q = q ** beta.view(-1, 1, 1)
    return _normalise(torch.exp(-0.5 * q))


def gaussian_kernel(
    size: int, sigma_x: torch.Tensor, sigma_y: torch.Tensor, theta: torch.Tensor
) -> torch.Tensor:
    """Bivariate (anisotropic when ``sigma_x != sigma_y``) Gaussian kernel, ``(B, size, size)``."""
    return generalized_gaussian_kernel(size, sigma_x, sigma_y, theta)


def plateau_kernel(
    size: int,
    sigma_x: torch.Tensor,
    sigma_y: torch.Tensor,
    theta: torch.Tensor,
    beta: torch.Tensor,
) -> torch.Tensor:
    """Plateau kernel ``1 / (1 + (d^T Sigma^-1 d)^beta)``, normalised (Real-ESRGAN Sec. 3.1)."""
    q = _quadratic_form(size, sigma_x, sigma_y, theta) ** beta.view(-1, 1, 1)
    return _normalise(1.0 / (1.0 + q))


def sinc_kernel(size: int, omega_c: torch.Tensor) -> torch.Tensor:
    """Circular low-pass (2-D sinc) kernel with cut-off ``omega_c`` (Real-ESRGAN Eq. 3), normalised.

    ``k(r) = omega_c J1(omega_c r) / (2 pi r)``; its value at ``r = 0`` is the limit
    ``omega_c^2 / (4 pi)``. It models ringing and overshoot artefacts.
    """
    xx, yy = _grid(size, torch.float64, omega_c.device)
    r = torch.sqrt(xx**2 + yy**2)
    omega = omega_c.to(torch.float64).view(-1, 1, 1)
    safe_r = torch.where(r > 0, r, torch.ones_like(r))
    values = omega * torch.special.bessel_j1(omega * safe_r) / (2 * math.pi * safe_r)
    values = torch.where(r > 0, values, omega**2 / (4 * math.pi))
    return _normalise(values)


def pulse_kernel(batch: int, size: int = MAX_KERNEL_SIZE) -> torch.Tensor:
    """The identity kernel (a single 1 at the centre): "no filtering" in a batch of kernels."""
    kernel = torch.zeros(batch, size, size, dtype=torch.float64)
    kernel[:, size // 2, size // 2] = 1.0
    return kernel


def sample_blur_kernels(
    config: BlurKernelConfig, batch: int, generator: torch.Generator
) -> torch.Tensor:
    """Draw ``batch`` blur kernels as Real-ESRGAN's data set does; ``(B, 21, 21)`` float64, sum 1.

    With probability ``sinc_prob`` a sinc kernel (cut-off in [pi/3, pi] below size 13, else
    [pi/5, pi]); otherwise one of the six Gaussian-family kernels by ``kernel_prob``. Each kernel
    has its own odd size from ``kernel_sizes`` and is zero-padded to 21 x 21.
    """
    sizes = torch.tensor(config.kernel_sizes)[
        _choice(generator, batch, [1.0] * len(config.kernel_sizes))
    ]
    is_sinc = _rand(generator, batch) < config.sinc_prob
    kinds = torch.tensor([KERNEL_TYPES.index(k) for k in config.kernel_list])[
        _choice(generator, batch, config.kernel_prob)
    ]
    sigma_x = _uniform(generator, batch, *config.sigma_range)
    sigma_y_aniso = _uniform(generator, batch, *config.sigma_range)
    theta_aniso = _uniform(generator, batch, *config.rotation_range)
    beta_g = _split_beta(generator, batch, config.betag_range)
    beta_p = _split_beta(generator, batch, config.betap_range)
    omega_small = _uniform(generator, batch, math.pi / 3, math.pi)
    omega_large = _uniform(generator, batch, math.pi / 5, math.pi)

    names = [KERNEL_TYPES[int(k)] for k in kinds]
    isotropic = torch.tensor([name.endswith("_iso") or name == "iso" for name in names])
    is_plateau = torch.tensor([name.startswith("plateau") for name in names])
    is_generalized = torch.tensor([name.startswith("generalized") for name in names])
    sigma_y = torch.where(isotropic, sigma_x, sigma_y_aniso)
    theta = torch.where(isotropic, torch.zeros_like(theta_aniso), theta_aniso)
    gaussian_beta = torch.ones(batch, dtype=torch.float64)
    beta = torch.where(is_plateau, beta_p, torch.where(is_generalized, beta_g, gaussian_beta))

    gaussian_family = generalized_gaussian_kernel(MAX_KERNEL_SIZE, sigma_x, sigma_y, theta, beta)
    plateau = plateau_kernel(MAX_KERNEL_SIZE, sigma_x, sigma_y, theta, beta)
    omega = torch.where(sizes < 13, omega_small, omega_large)
    sinc = sinc_kernel(MAX_KERNEL_SIZE, omega)

    kernels = torch.where(is_plateau.view(-1, 1, 1), plateau, gaussian_family)
    kernels = torch.where(is_sinc.view(-1, 1, 1), sinc, kernels)
    return _normalise(kernels * _support_mask(sizes, MAX_KERNEL_SIZE))


def sample_final_sinc_kernels(
    config: RealESRGANDegradationConfig, batch: int, generator: torch.Generator
) -> torch.Tensor:
    """The final-stage kernels: a sinc with probability ``final_sinc_prob``, else the identity."""
    sizes = torch.tensor(config.final_kernel_sizes)[
        _choice(generator, batch, [1.0] * len(config.final_kernel_sizes))
    ]
    omega = _uniform(generator, batch, *config.final_sinc_omega_range)
    apply = _rand(generator, batch) < config.final_sinc_prob
    sinc = _normalise(sinc_kernel(MAX_KERNEL_SIZE, omega) * _support_mask(sizes, MAX_KERNEL_SIZE))
    return torch.where(apply.view(-1, 1, 1), sinc, pulse_kernel(batch))


# ---------------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------------


def filter2d(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve each image of ``(B, C, H, W)`` with its own ``(B, k, k)`` kernel (reflect padding).

    Reflect padding needs the padding to be smaller than the image; tiny intermediate images (after
    a strong down-scale) fall back to replicate padding.
    """
    batch, channels, height, width = images.shape
    size = kernels.shape[-1]
    pad = size // 2
    mode = "reflect" if pad < height and pad < width else "replicate"
    padded = F.pad(images, (pad, pad, pad, pad), mode=mode)
    weight = kernels.to(images.dtype).to(images.device)
    weight = weight.repeat_interleave(channels, dim=0).unsqueeze(1)  # (B*C, 1, k, k)
    # Grouped convolution = one kernel per (image, channel) pair in a single call.
    out = F.conv2d(
        padded.reshape(1, batch * channels, *padded.shape[-2:]), weight, groups=batch * channels
    )
    return out.reshape(batch, channels, height, width)


def resize(images: torch.Tensor, size: tuple[int, int], mode: ResizeMode) -> torch.Tensor:
    """Resize ``(B, C, H, W)`` to ``size`` with one of Real-ESRGAN's three interpolation modes."""
    size = (max(1, size[0]), max(1, size[1]))
    if mode == "area":
        return F.interpolate(images, size=size, mode="area")
    return F.interpolate(images, size=size, mode=mode, align_corners=False)


def _to_gray(images: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
    return (images * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


def _on(generator: torch.Generator, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(generator.device)


def gaussian_noise(
    images: torch.Tensor, sigma: torch.Tensor, gray: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Additive Gaussian noise; ``sigma`` per image in [0, 1] units, ``gray`` per image (bool).

    Gray noise is one noise map shared by the three channels (Real-ESRGAN Sec. 3.1).
    """
    batch, _, height, width = images.shape
    color = torch.randn(images.shape, generator=generator, device=generator.device)
    mono = torch.randn((batch, 1, height, width), generator=generator, device=generator.device)
    noise = torch.where(_on(generator, gray).view(-1, 1, 1, 1), mono.expand_as(color), color)
    noise = noise.to(images.device, images.dtype)
    return noise * sigma.to(images.device, images.dtype).view(-1, 1, 1, 1)


def _quantisation_levels(images: torch.Tensor) -> torch.Tensor:
    """Per image, the number of distinct 8-bit levels rounded up to a power of two.

    Poisson noise scales with the photon count; treating the distinct levels as the count gives
    the signal-dependent noise of Real-ESRGAN's Poisson model.
    """
    batch = images.shape[0]
    codes = torch.round(images * 255.0).clamp(0, 255).to(torch.int64).flatten(1)
    # One histogram for the whole batch: image i's levels occupy bins [256 i, 256 i + 255].
    offsets = 256 * torch.arange(batch, device=images.device).view(-1, 1)
    histogram = torch.bincount((codes + offsets).flatten(), minlength=256 * batch)
    distinct = (histogram.view(batch, 256) > 0).sum(dim=1).clamp(min=2).to(torch.float64)
    return (2.0 ** torch.ceil(torch.log2(distinct))).to(images.dtype)


def _poisson_part(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    quantised = torch.clamp(torch.round(images * 255.0), 0, 255) / 255.0
    vals = _quantisation_levels(quantised).view(-1, 1, 1, 1)
    rates = _on(generator, quantised * vals)
    counts = torch.poisson(rates, generator=generator).to(images.device)
    return counts / vals - quantised


def poisson_noise(
    images: torch.Tensor, scale: torch.Tensor, gray: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Signal-dependent Poisson noise times ``scale`` per image; ``gray`` uses the luminance."""
    noise = torch.zeros_like(images)
    gray_index = torch.nonzero(gray.cpu()).flatten().to(images.device)
    color_index = torch.nonzero(~gray.cpu()).flatten().to(images.device)
    if color_index.numel():
        noise[color_index] = _poisson_part(images[color_index], generator)
    if gray_index.numel():
        mono = _poisson_part(_to_gray(images[gray_index]), generator)
        noise[gray_index] = mono.expand(-1, images.shape[1], -1, -1)
    return noise * scale.to(images.device, images.dtype).view(-1, 1, 1, 1)


# JPEG (ITU-T T.81 Annex K) quantisation tables, row-major in zig-zag-free (natural) order.
_LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    *((99,) * 8 for _ in range(4)),
)


def jpeg_quantisation_tables(quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Luma and chroma tables ``(B, 8, 8)`` for JPEG quality in [1, 100], scaled as libjpeg does.

    ``scale = 5000 / q`` below 50, ``200 - 2 q`` above; ``table = floor((base * scale + 50) / 100)``
    clipped to [1, 255]. Fractional qualities are allowed (Real-ESRGAN draws them uniformly).
    """
    q = quality.to(torch.float64).clamp(1.0, 100.0).view(-1, 1, 1)
    scale = torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)
    tables = []
    for base in (_LUMA_TABLE, _CHROMA_TABLE):
        base_t = torch.tensor(base, dtype=torch.float64, device=quality.device)
        tables.append(torch.floor((base_t * scale + 50.0) / 100.0).clamp(1.0, 255.0))
    return tables[0], tables[1]


def _dct_matrix(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Orthonormal 8-point DCT-II; ``D X D^T`` equals JPEG's forward DCT of an 8 x 8 block."""
    k = torch.arange(8, dtype=torch.float64).view(-1, 1)
    n = torch.arange(8, dtype=torch.float64).view(1, -1)
    matrix = torch.cos(math.pi * (2 * n + 1) * k / 16) * math.sqrt(2 / 8)
    matrix[0] = math.sqrt(1 / 8)
    return matrix.to(device=device, dtype=dtype)


def _rgb_to_ycbcr_jfif(rgb: torch.Tensor) -> torch.Tensor:
    """Full-range YCbCr of JFIF (values in [0, 255])."""
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128.0
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128.0
    return torch.stack((y, cb, cr), dim=1)


def _ycbcr_to_rgb_jfif(ycc: torch.Tensor) -> torch.Tensor:
    y, cb, cr = ycc[:, 0], ycc[:, 1] - 128.0, ycc[:, 2] - 128.0
    r = y + 1.402 * cr
    g = y - 0.344136 * cb - 0.714136 * cr
    b = y + 1.772 * cb
    return torch.stack((r, g, b), dim=1)


def _quantise_blocks(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """DCT, quantise with the per-image ``table`` (B, 8, 8), dequantise, invert; 8x8 blocks."""
    batch, channels, height, width = plane.shape
    blocks = plane.reshape(batch, channels, height // 8, 8, width // 8, 8).permute(0, 1, 2, 4, 3, 5)
    dct = _dct_matrix(plane.dtype, plane.device)
    coeffs = dct @ (blocks - 128.0) @ dct.T
    step = table.to(plane.device, plane.dtype).view(batch, 1, 1, 1, 8, 8)
    coeffs = torch.round(coeffs / step) * step
    restored = dct.T @ coeffs @ dct + 128.0
    return restored.permute(0, 1, 2, 4, 3, 5).reshape(batch, channels, height, width)


def jpeg_torch(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Baseline JPEG round trip in torch (DiffJPEG-style), per-image quality, on any device.

    RGB in [0, 1] -> JFIF YCbCr -> 4:2:0 chroma (2x2 mean) -> 8x8 DCT -> quantisation with the
    standard tables scaled by quality -> inverse -> nearest chroma up-sampling -> RGB, rounded to
    8-bit levels. Images are edge-padded to a multiple of 16 (the 4:2:0 MCU) and cropped back.
    """
    batch, _, height, width = images.shape
    x = images.clamp(0.0, 1.0).to(torch.float32) * 255.0
    pad_h, pad_w = (-height) % 16, (-width) % 16
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    ycc = _rgb_to_ycbcr_jfif(x)
    luma_table, chroma_table = jpeg_quantisation_tables(quality.reshape(batch))
    y = _quantise_blocks(ycc[:, :1], luma_table)
    chroma = F.avg_pool2d(ycc[:, 1:], kernel_size=2)
    chroma = _quantise_blocks(chroma, chroma_table)
    chroma = F.interpolate(chroma, scale_factor=2, mode="nearest")
    rgb = _ycbcr_to_rgb_jfif(torch.cat((y, chroma), dim=1))[..., :height, :width]
    rgb = torch.round(rgb.clamp(0.0, 255.0)) / 255.0
    return rgb.to(images.dtype)


def jpeg_pillow(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG round trip through Pillow (libjpeg, 4:2:0), quality rounded to an integer; CPU-bound."""
    out = []
    for image, q in zip(images, quality.reshape(-1).tolist(), strict=True):
        array = (image.clamp(0, 1).permute(1, 2, 0).detach().cpu().numpy() * 255.0).round()
        buffer = io.BytesIO()
        Image.fromarray(array.astype(np.uint8)).save(
            buffer, format="JPEG", quality=round(q), subsampling=2
        )
        buffer.seek(0)
        decoded = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(decoded).permute(2, 0, 1))
    return torch.stack(out).to(images.device, images.dtype)


def jpeg(
    images: torch.Tensor, quality: torch.Tensor, backend: JpegBackend = "torch"
) -> torch.Tensor:
    """JPEG compression with per-image ``quality``, by the chosen backend."""
    if backend == "torch":
        return jpeg_torch(images, quality)
    if backend == "pillow":
        return jpeg_pillow(images, quality)
    raise ValueError(f"unknown JPEG backend {backend!r}")


# ---------------------------------------------------------------------------------------------
# The degradation model
# ---------------------------------------------------------------------------------------------


class RealESRGANDegradation:
    """Real-ESRGAN's second-order degradation (Wang et al. 2021, Sec. 3.2, Fig. 2), batched.

    ``degradation(hr, generator)`` maps HR images ``(B, 3, H, W)`` in [0, 1] (float, any device) to
    LR images ``(B, 3, H // scale, W // scale)`` in [0, 1] quantised to 8-bit levels.
    """

    def __init__(self, config: RealESRGANDegradationConfig | None = None) -> None:
        self.config = config or RealESRGANDegradationConfig()

    def check_inputs(self, hr: torch.Tensor) -> None:
        if hr.ndim != 4 or hr.shape[1] != 3:
            raise ValueError(f"expected HR images shaped (B, 3, H, W), got {tuple(hr.shape)}")
        if not hr.is_floating_point():
            raise ValueError(f"expected a floating-point tensor in [0, 1], got {hr.dtype}")
        scale = self.config.scale
        if hr.shape[-2] < scale or hr.shape[-1] < scale:
            raise ValueError(
                f"HR images of {tuple(hr.shape[-2:])} are smaller than the scale {scale}"
            )

    def _resize_mode(self, generator: torch.Generator) -> ResizeMode:
        modes = self.config.resize_modes
        return modes[int(_choice(generator, 1, [1.0] * len(modes))[0])]

    def _random_resize(
        self,
        images: torch.Tensor,
        order: DegradationOrderConfig,
        generator: torch.Generator,
        reference: tuple[int, int],
    ) -> torch.Tensor:
        """Resize by one factor per batch: up, down or keep by ``resize_prob`` (Real-ESRGAN 3.1).

        The first order scales the current size; the second scales the target LR size, as in
        Real-ESRGAN, so the two orders compose into a total factor around ``1 / scale``.
        """
        direction = int(_choice(generator, 1, order.resize_prob)[0])
        up = float(_uniform(generator, 1, 1.0, order.resize_range[1])[0])
        down = float(_uniform(generator, 1, order.resize_range[0], 1.0)[0])
        factor = (up, down, 1.0)[direction]
        mode = self._resize_mode(generator)
        size = (int(reference[0] * factor), int(reference[1] * factor))
        return resize(images, size, mode)

    def _random_noise(
        self, images: torch.Tensor, order: DegradationOrderConfig, generator: torch.Generator
    ) -> torch.Tensor:
        batch = images.shape[0]
        use_gaussian = _rand(generator, batch) < order.gaussian_noise_prob
        gray = _rand(generator, batch) < order.gray_noise_prob
        sigma = _uniform(generator, batch, *order.noise_range) / 255.0
        poisson_scale = _uniform(generator, batch, *order.poisson_scale_range)
        noise = torch.zeros_like(images)
        # Only the images that drew a noise type pay for generating it.
        for chosen, make, level in (
            (use_gaussian, gaussian_noise, sigma),
            (~use_gaussian, poisson_noise, poisson_scale),
        ):
            index = torch.nonzero(chosen).flatten()
            if index.numel():
                on_device = index.to(images.device)
                noise[on_device] = make(images[on_device], level[index], gray[index], generator)
        return (images + noise).clamp(0.0, 1.0)

    def _random_jpeg(
        self, images: torch.Tensor, order: DegradationOrderConfig, generator: torch.Generator
    ) -> torch.Tensor:
        quality = _uniform(generator, images.shape[0], *order.jpeg_range)
        return jpeg(images.clamp(0.0, 1.0), quality, self.config.jpeg_backend)

    def __call__(self, hr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Degrade a batch; every random choice comes from ``generator``."""
        self.check_inputs(hr)
        cfg = self.config
        batch, _, height, width = hr.shape
        lr_size = (height // cfg.scale, width // cfg.scale)

        # 1. Kernels for the whole batch first, so the sequence of draws does not depend on shapes.
        kernel1 = sample_blur_kernels(cfg.first.blur, batch, generator)
        kernel2 = sample_blur_kernels(cfg.second.blur, batch, generator)
        skip_second_blur = _rand(generator, batch) >= cfg.second_blur_prob
        kernel2 = torch.where(skip_second_blur.view(-1, 1, 1), pulse_kernel(batch), kernel2)
        final_kernel = sample_final_sinc_kernels(cfg, batch, generator)

        # 2. First order: blur -> resize -> noise -> JPEG.
        out = filter2d(hr, kernel1)
        out = self._random_resize(out, cfg.first, generator, (height, width))
        out = self._random_noise(out, cfg.first, generator)
        out = self._random_jpeg(out, cfg.first, generator)

        # 3. Second order, its resize relative to the target LR size.
        out = filter2d(out, kernel2)
        out = self._random_resize(out, cfg.second, generator, lr_size)
        out = self._random_noise(out, cfg.second, generator)

        # 4. Final stage in one of two orders: resize + sinc then JPEG, or JPEG then resize + sinc.
        resize_first = bool(_rand(generator, 1)[0] < cfg.final_resize_first_prob)
        mode = self._resize_mode(generator)
        quality = _uniform(generator, batch, *cfg.second.jpeg_range)
        if resize_first:
            out = filter2d(resize(out, lr_size, mode), final_kernel)
            out = jpeg(out.clamp(0.0, 1.0), quality, cfg.jpeg_backend)
        else:
            out = jpeg(out.clamp(0.0, 1.0), quality, cfg.jpeg_backend)
            out = filter2d(resize(out, lr_size, mode), final_kernel)

        # 5. Real-ESRGAN quantises the LR to 8-bit levels, as a saved image would be.
        return torch.round(out.clamp(0.0, 1.0) * 255.0) / 255.0


def degrade_image(
    hr: Image.Image,
    *,
    seed: int,
    config: RealESRGANDegradationConfig | None = None,
) -> Image.Image:
    """Degrade one PIL image (cropped to a multiple of the scale) with a seeded generator."""
    degradation = RealESRGANDegradation(config)
    scale = degradation.config.scale
    rgb = hr.convert("RGB")
    width, height = rgb.width - rgb.width % scale, rgb.height - rgb.height % scale
    rgb = rgb.crop((0, 0, width, height))
    tensor = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    generator = torch.Generator().manual_seed(seed)
    lr = degradation(tensor, generator)[0]
    array = (lr.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(array)
