"""Tile grid, per-tile boxes, Gaussian weights, the tiled VAE with shared GroupNorm statistics."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from model.pipeline.diffusion import SpaSemSRPipeline
from model.pipeline.prompt import GroundedPrompt
from model.pipeline.tiling import (
    STATISTICS,
    Tile,
    boxes_for_tile,
    gaussian_weights,
    owned_regions,
    tile_grid,
    tiled_apply,
    tiled_vae_decode,
    tiled_vae_encode,
)


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap"), [(32, 32, 16, 4), (37, 29, 10, 3), (8, 64, 16, 4)]
)
def test_tile_grid_covers_with_overlap(height: int, width: int, tile: int, overlap: int) -> None:
    tiles = tile_grid(height, width, tile, overlap)
    cover = torch.zeros(height, width)
    for t in tiles:
        assert t.height == min(tile, height) and t.width == min(tile, width)
        assert t.top + t.height <= height and t.left + t.width <= width
        cover[t.slices] += 1
    assert cover.min() >= 1
    for axis_starts, size in (
        (sorted({t.top for t in tiles}), min(tile, height)),
        (sorted({t.left for t in tiles}), min(tile, width)),
    ):
        for a, b in itertools.pairwise(axis_starts):
            assert a + size - b >= overlap  # neighbours share at least `overlap` cells
    owned = torch.zeros(height, width)
    for region in owned_regions(tiles):
        owned[region.slices] += 1
    assert torch.equal(owned, torch.ones(height, width))  # ownership partitions the grid


def test_tile_grid_aligns_starts() -> None:
    tiles = tile_grid(50, 50, 16, 4, align=2)
    assert all(
        t.top % 2 == 0 and t.left % 2 == 0 for t in tiles if t.top + 16 < 50 and t.left + 16 < 50
    )


def test_single_tile_when_it_fits() -> None:
    assert tile_grid(12, 9, 16, 4) == [Tile(0, 0, 12, 9)]


def test_gaussian_weights_peak_in_the_middle() -> None:
    weights = gaussian_weights(16, 10)
    assert weights.shape == (16, 10)
    torch.testing.assert_close(weights, weights.flip(0))
    torch.testing.assert_close(weights, weights.flip(1))
    assert weights.max() == weights[7:9, 4:6].max() and weights.min() > 0


def test_boxes_for_tile_reprojects_intersecting_boxes() -> None:
    prompt = GroundedPrompt(
        tags=("sky", "dog", "sand", "bird"),
        boxes=(
            (0.0, 0.0, 1.0, 0.5),
            (0.6, 0.6, 0.8, 0.9),
            (0.0, 0.5, 1.0, 1.0),
            (0.25, 0.25, 0.25, 0.25),
        ),
        caption="a beach",
        estimates={"noise": 0.1},
    )
    local = boxes_for_tile(prompt, (0.0, 0.0, 0.5, 0.5))
    assert local.tags == ("sky", "bird")  # "sand" only touches the tile's edge; "dog" is elsewhere
    assert local.boxes == ((0.0, 0.0, 1.0, 1.0), (0.5, 0.5, 0.5, 0.5))
    assert local.caption == "a beach" and local.estimates == {"noise": 0.1}
    right = boxes_for_tile(prompt, (0.5, 0.4, 1.0, 1.0))
    assert right.tags == ("sky", "dog", "sand")
    assert right.boxes[0] == pytest.approx((0.0, 0.0, 1.0, 1 / 6))
    assert right.boxes[1] == pytest.approx((0.2, 1 / 3, 0.6, 5 / 6))
    assert right.boxes[2] == pytest.approx((0.0, 1 / 6, 1.0, 1.0))
    assert boxes_for_tile(prompt, (0.0, 0.0, 1.0, 1.0)) == prompt
    with pytest.raises(ValueError):
        boxes_for_tile(prompt, (0.5, 0.5, 0.5, 1.0))


def test_shared_statistics_make_a_tiled_group_norm_exact() -> None:
    norm = nn.GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(1, 8, 37, 29) * 3 + torch.linspace(
        -2, 2, 29
    )  # inhomogeneous: per-tile stats differ
    with torch.no_grad():
        tiled = tiled_apply(norm, norm, x, tiles=tile_grid(37, 29, 10, 3), factor=1, ramp=3)
        per_tile = tiled_apply(
            norm, nn.Identity(), x, tiles=tile_grid(37, 29, 10, 3), factor=1, ramp=3
        )
        full = norm(x)
    assert (tiled - full).abs().max() < 1e-4
    assert (per_tile - full).abs().max() > 0.1


def test_tiled_vae_is_the_plain_vae_when_one_tile_fits(tiny_pipeline: SpaSemSRPipeline) -> None:
    vae = tiny_pipeline.vae
    latents = torch.randn(1, 4, 12, 10)
    with torch.no_grad():
        plain = vae.decode(latents / vae.config.scaling_factor).sample
        assert torch.equal(tiled_vae_decode(vae, latents, tile=16, overlap=4), plain)
        image = plain.clamp(-1, 1)
        encoded = vae.encode(image).latent_dist.mode() * vae.config.scaling_factor
        assert torch.equal(tiled_vae_encode(vae, image, tile=16, overlap=4), encoded)


@pytest.mark.parametrize("statistics", STATISTICS)
def test_tiled_vae_keeps_the_tone_of_the_whole_image(
    tiny_pipeline: SpaSemSRPipeline, statistics: str
) -> None:
    """Shared GroupNorm statistics keep the whole image's tone; per-tile statistics do not."""
    vae = tiny_pipeline.vae
    generator = torch.Generator().manual_seed(0)
    latents = F.interpolate(
        torch.randn(1, 4, 6, 5, generator=generator), size=(48, 40), mode="bilinear"
    )
    latents = latents + torch.linspace(-2, 2, 40)  # a strong left-to-right change of tone
    scale = vae.config.scaling_factor
    with torch.no_grad():
        full = vae.decode(latents / scale).sample
        tiled = tiled_vae_decode(vae, latents, tile=16, overlap=4, statistics=statistics)
        per_tile = tiled_apply(
            lambda z: vae.decode(z / scale).sample,
            nn.Identity(),
            latents,
            tiles=tile_grid(48, 40, 16, 4),
            factor=8,
            ramp=32,
        )
    assert tiled.shape == full.shape == (1, 3, 384, 320)
    shared_error = (tiled - full).abs().mean().item()
    assert shared_error < 0.7 * (per_tile - full).abs().mean().item()
    assert shared_error < 0.1

    image = full.clamp(-1, 1)
    with torch.no_grad():
        encoded = vae.encode(image).latent_dist.mode() * scale
        tiled_encoded = tiled_vae_encode(vae, image, tile=16, overlap=4, statistics=statistics)
    assert tiled_encoded.shape == encoded.shape
    assert (tiled_encoded - encoded).abs().mean() < 0.2 * encoded.abs().mean()
