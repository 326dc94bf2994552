"""Trained-looking SpaSemSR blocks for tests that must be able to fail.

A fresh pipeline's additions are zero-initialised (ControlNet zero convolutions and guidance
fusion, the fused attention's output, the UNet's added attention outputs), so it predicts exactly
what the stock UNet predicts: a test of save/load, tiling, seams or batching run on it passes
whether or not a zero convolution, a UNet addition or the guidance survives. After
:func:`perturb_trained_blocks` every trained block changes the output, so losing any of them
shows.
"""

from __future__ import annotations

import torch

from model.pipeline.diffusion import SpaSemSRPipeline

TRAINED_BLOCKS = ("controlnet", "unet_attention", "image_encoder", "semantic_encoder")
ZERO_SCALE = 0.05
"""Standard deviation given to zero-initialised parameters: large enough that each changes the
prediction visibly, small enough that a few sampling steps stay well inside the latent range."""
RELATIVE_SCALE = 0.05
"""Noise added to the other parameters, relative to each tensor's own spread, so that a block
rebuilt fresh (e.g. the image encoder from the VAE) differs from the saved one."""


def perturb_trained_blocks(pipeline: SpaSemSRPipeline, seed: int = 0) -> SpaSemSRPipeline:
    """Perturb ``pipeline``'s trained blocks in place, deterministically from ``seed``; returns
    it. The frozen UNet, VAE and text encoder are left alone.

    In place: pass a pipeline of the test's own (``build_tiny_pipeline(seed)``), never the
    session-wide ``tiny_pipeline`` fixture, which other tests expect fresh.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in TRAINED_BLOCKS:
            for parameter in getattr(pipeline, name).parameters():
                noise = torch.randn(parameter.shape, generator=generator)
                noise = noise.to(parameter.device, parameter.dtype)
                if torch.count_nonzero(parameter) == 0:
                    parameter.copy_(noise * ZERO_SCALE)
                    continue
                spread = float(parameter.float().std()) if parameter.numel() > 1 else 0.0
                parameter.add_(noise * RELATIVE_SCALE * (spread or abs(float(parameter.mean()))))
    return pipeline
