"""The frozen position encoder of SpaSemSR's spatial-aware text (arXiv 2603.14112, Fig. 2a).

Each object's box ``[x_lu, y_lu, x_rb, y_rb]`` (normalised to [0, 1]) becomes a vector of the
text encoder's width, which the aligned token add puts onto that tag's token embeddings. The
figure marks the position encoder frozen; the paper does not say what it is. Ours [I] has no
weights: Fourier features as in GLIGEN's box embedder, ``4 coordinates x F frequencies x (sin,
cos)`` with ``F = width / 8`` (128 for SD2's 1024-d OpenCLIP-H tokens), frequencies ``temperature
** (k / F)``.

Every pair ``(sin, cos)`` has norm 1, so an embedding has norm ``sqrt(width / 2)`` whatever the
box: its direction says where, its length says nothing. :mod:`model.blocks.text` therefore rescales
it to the norm of the tokens it is added to.
"""

from __future__ import annotations

import torch
from torch import nn


class FourierPositionEncoder(nn.Module):
    """Box ``(..., 4)`` -> ``(..., dim)``: ``sin(f_k c), cos(f_k c)`` for each coordinate ``c``."""

    freqs: torch.Tensor

    def __init__(self, dim: int, *, temperature: float = 100.0) -> None:
        super().__init__()
        if dim <= 0 or dim % 8 != 0:
            raise ValueError(
                f"the text width {dim} must be a positive multiple of 8 (4 coords x sin/cos)"
            )
        self.dim = dim
        self.num_freqs = dim // 8
        self.temperature = temperature
        freqs = temperature ** (torch.arange(self.num_freqs, dtype=torch.float32) / self.num_freqs)
        self.register_buffer("freqs", freqs, persistent=False)
        self.requires_grad_(False)

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        if boxes.shape[-1] != 4:
            raise ValueError(f"boxes must end in 4 coordinates, got shape {tuple(boxes.shape)}")
        angles = boxes.to(torch.float32)[..., :, None] * self.freqs  # (..., 4, F)
        features = torch.stack((angles.sin(), angles.cos()), dim=-1)  # (..., 4, F, 2)
        return features.flatten(-3)
