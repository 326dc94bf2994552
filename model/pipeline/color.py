"""Colour fix of the decoded image against the upsampled input (DESIGN 1.2 step 9 [I]).

Diffusion SR drifts in colour; StableSR, PASD and SeeSR correct it after decoding. Both modes
work on ``(B, C, H, W)`` tensors in any consistent range:

* ``adain``: per-channel mean and standard deviation of the result set to the reference's
  (adaptive instance normalisation);
* ``wavelet``: the result's high frequencies plus the reference's low frequencies, from a
  five-level à-trous decomposition with the 3x3 binomial kernel dilated by ``2**i`` (StableSR's
  ``wavelet_reconstruction``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

COLOR_FIX_MODES: tuple[str, ...] = ("none", "adain", "wavelet")


def _mean_std(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.flatten(2)
    mean = flat.mean(dim=2)[..., None, None]
    std = (flat.var(dim=2) + eps).sqrt()[..., None, None]
    return mean, std


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``(image - mean(image)) / std(image) * std(reference) + mean(reference)``, per sample and
    channel."""
    image_mean, image_std = _mean_std(image)
    reference_mean, reference_std = _mean_std(reference)
    return (image - image_mean) / image_std * reference_std + reference_mean


def wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    """One à-trous level: the binomial 3x3 kernel dilated by ``radius``, replicate padding."""
    channels = image.shape[1]
    kernel = torch.tensor(
        [[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]],
        dtype=image.dtype,
        device=image.device,
    )
    kernel = kernel.expand(channels, 1, 3, 3)
    padded = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=radius)


def wavelet_decomposition(
    image: torch.Tensor, levels: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(high, low)``, ``high + low == image``: the summed detail bands and the residual."""
    high = torch.zeros_like(image)
    low = image
    for level in range(levels):
        blurred = wavelet_blur(low, 2**level)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """High frequencies of ``image`` plus low frequencies of ``reference``."""
    image_high, _ = wavelet_decomposition(image)
    _, reference_low = wavelet_decomposition(reference)
    return image_high + reference_low


def apply_color_fix(image: torch.Tensor, reference: torch.Tensor, mode: str) -> torch.Tensor:
    """Apply colour fix ``mode`` (``none | adain | wavelet``), computed in float32."""
    if mode == "none":
        return image
    if image.shape != reference.shape:
        raise ValueError(
            f"colour fix needs equal shapes, got {tuple(image.shape)} and {tuple(reference.shape)}"
        )
    x, ref = image.float(), reference.float()
    if mode == "adain":
        fixed = adain_color_fix(x, ref)
    elif mode == "wavelet":
        fixed = wavelet_color_fix(x, ref)
    else:
        raise ValueError(f"unknown colour fix {mode!r}; expected one of {COLOR_FIX_MODES}")
    return fixed.to(image.dtype)
