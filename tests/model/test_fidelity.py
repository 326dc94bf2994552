"""Tests that can fail: SpaSemSR's trained blocks perturbed away from their zero start, so that
a lost zero convolution, UNet addition or guidance path changes what is compared; and the
scale at which the box embedding joins its tokens."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.blocks.encoders import visual_guidance
from model.blocks.position import FourierPositionEncoder
from model.blocks.text import box_embeddings_at_token_scale
from model.blocks.unet_attention import unet_with_control
from model.configs.spasemsr import build_tiny_pipeline
from model.pipeline.diffusion import SpaSemSRPipeline
from model.pipeline.prompt import GroundedPrompt
from tests.model.perturb import TRAINED_BLOCKS, perturb_trained_blocks

PROMPT = GroundedPrompt(
    tags=("sky", "sand", "dog"),
    boxes=((0.0, 0.0, 1.0, 0.45), (0.0, 0.45, 1.0, 1.0), (0.55, 0.5, 0.9, 0.95)),
    caption="A noisy, low-resolution image of a beach with a dog.",
)
ROUND_TRIP = 1e-5
LOST_BLOCK = 2e-4


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [0.5 + 0.4 * np.sin(5 * xx + 3 * yy + p) for p in rng.uniform(0, 6, size=3)]
    return Image.fromarray((np.stack(channels, -1) * 255).astype(np.uint8))


def upscale(pipeline: SpaSemSRPipeline, image: Image.Image) -> torch.Tensor:
    output = pipeline(
        image,
        scale=2,
        prompt=PROMPT,
        num_inference_steps=2,
        color_fix="none",
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    images = output.images
    assert isinstance(images, torch.Tensor)
    return images


@pytest.fixture(scope="module")
def perturbed() -> SpaSemSRPipeline:
    return perturb_trained_blocks(build_tiny_pipeline(seed=0), seed=1)


def test_a_perturbed_pipeline_round_trips_and_every_trained_block_counts(
    perturbed: SpaSemSRPipeline, tmp_path: Path
) -> None:
    """Save and load give the same image; and the comparison can fail: putting any one trained
    block back to its fresh weights (as a lost block file would) changes the image.

    "The same" up to float rounding (``ROUND_TRIP``): with identical weights and inputs, CPU
    matrix kernels may round differently from one allocation of a module to another (seen here
    at ~1e-6 in the UNet's linear projections), so bit equality would test the allocator. A lost
    block moves the image by at least ``LOST_BLOCK``, far above that."""
    image = smooth_image(20, 14)
    reference = upscale(perturbed, image)
    perturbed.save_pretrained(tmp_path / "pipe")
    loaded = SpaSemSRPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
    torch.testing.assert_close(upscale(loaded, image), reference, atol=ROUND_TRIP, rtol=0)

    fresh = build_tiny_pipeline(seed=0)
    assert float((upscale(fresh, image) - reference).abs().max()) > LOST_BLOCK
    for name in TRAINED_BLOCKS:
        block = getattr(loaded, name)
        kept = copy.deepcopy(block.state_dict())
        block.load_state_dict(getattr(fresh, name).state_dict())
        try:
            changed = upscale(loaded, image)
        finally:
            block.load_state_dict(kept)
        assert float((changed - reference).abs().max()) > LOST_BLOCK, name


def test_batching_changes_no_sample_of_the_denoiser(perturbed: SpaSemSRPipeline) -> None:
    """ControlNet + UNet with every addition live: a batch of three gives each sample what it
    gives alone (no attention or residual mixes samples)."""
    generator = torch.Generator().manual_seed(3)
    width = perturbed.text_encoder.config.hidden_size
    sample = torch.randn(3, 4, 16, 16, generator=generator)
    timestep = torch.tensor([10, 500, 900])
    text = torch.randn(3, 77, width, generator=generator)
    spatial = torch.randn(3, 77, width, generator=generator)
    images = torch.rand(3, 3, 128, 128, generator=generator) * 2 - 1

    def denoise(rows: slice) -> torch.Tensor:
        encoders = (perturbed.image_encoder, perturbed.semantic_encoder)
        guidance = visual_guidance(*encoders, images[rows])
        control = perturbed.controlnet(
            sample[rows],
            timestep[rows],
            spatial_text=spatial[rows],
            degradation_text=text[rows],
            guidance=guidance,
        )
        assert all(torch.count_nonzero(r) > 0 for r in control.down_block_res_samples)
        return unet_with_control(
            perturbed.unet, sample[rows], timestep[rows], text=text[rows],
            spatial_text=spatial[rows], control=control,
        )  # fmt: skip

    with torch.no_grad():
        batched = denoise(slice(0, 3))
        for index in range(3):
            alone = denoise(slice(index, index + 1))
            torch.testing.assert_close(batched[index : index + 1], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("width", [32, 1024])
def test_the_box_embedding_joins_at_the_norm_of_its_tokens(width: int) -> None:
    """At any text width the box adds a vector as long as its tag's tokens, not the Fourier
    features' own ``sqrt(width / 2)``."""
    encoder = FourierPositionEncoder(width)
    boxes = torch.tensor([[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0]])
    raw = encoder(boxes)
    torch.testing.assert_close(raw.norm(dim=-1), torch.full((2,), (width / 2) ** 0.5))
    tokens = torch.randn(2, 77, width, generator=torch.Generator().manual_seed(0))
    tokens[1] *= 7.0  # a second sequence at another scale
    indices = [[1, 2], [4]]
    scaled = box_embeddings_at_token_scale(tokens, indices, raw)
    assert scaled.shape == (2, 2, width)
    for sequence in range(2):
        for tag, tag_indices in enumerate(indices):
            expected = tokens[sequence, tag_indices].norm(dim=-1).mean()
            torch.testing.assert_close(scaled[sequence, tag].norm(), expected)
