"""The fast tiled VAE: one pass per tile in batches, GroupNorm statistics from a mosaic, the shared
normalisation in the activation's dtype and layout, compilable; checked against the untiled VAE."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from torch import nn

from model.configs.spasemsr import TINY
from model.pipeline.diffusion import SpaSemSRPipeline
from model.pipeline.tiling import (
    STATISTICS,
    GroupStats,
    SharedNorm,
    mosaic,
    owned_regions,
    recorded_group_norm_stats,
    shared_group_norm_stats,
    tile_grid,
    tiled_apply,
    tiled_vae_decode,
    tiled_vae_encode,
)

# 48 x 40 latent cells in tiles of 16 with 4 of overlap: 4 x 3 = 12 tiles, more cells than the
# statistics pass (4 tiles), so the tiled path runs.
SHAPE = (48, 40)
TILE, OVERLAP = 16, 4


def _smooth_latents() -> torch.Tensor:
    """Smooth content with a strong left-to-right change of tone: per-tile statistics differ."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 4, 6, 5, generator=generator)
    return F.interpolate(coarse, size=SHAPE, mode="bilinear") + torch.linspace(-2, 2, SHAPE[1])


def _noise_latents() -> torch.Tensor:
    """Cell-level detail everywhere (a diffusion latent has plenty): a downsampled statistics pass
    underestimates every variance here."""
    return torch.randn(1, 4, *SHAPE, generator=torch.Generator().manual_seed(1))


def _untiled(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    decoded: torch.Tensor = vae.decode(latents / vae.config["scaling_factor"]).sample
    return decoded


def _per_tile(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Tiles normalised by their own statistics: what shared statistics exist to avoid."""
    return tiled_apply(
        lambda z: _untiled(vae, z),
        nn.Identity(),
        latents,
        tiles=tile_grid(*SHAPE, TILE, OVERLAP),
        factor=8,
        ramp=OVERLAP * 8,
    )


def _tone_steps(error: torch.Tensor) -> float:
    """The largest difference in mean error between two tiles' owned regions: a tile whose tone
    differs from its neighbours' shows up here."""
    regions = owned_regions(tile_grid(*SHAPE, TILE, OVERLAP))
    means = [error[..., r.scaled(8).slices[0], r.scaled(8).slices[1]].mean() for r in regions]
    return float(torch.stack(means).max() - torch.stack(means).min())


@pytest.mark.parametrize("latents", [_smooth_latents(), _noise_latents()], ids=["smooth", "noise"])
def test_tiled_decode_matches_the_untiled_decode_without_seams(
    tiny_pipeline: SpaSemSRPipeline, latents: torch.Tensor
) -> None:
    vae = tiny_pipeline.vae
    with torch.no_grad():
        full = _untiled(vae, latents)
        tiled = tiled_vae_decode(vae, latents, tile=TILE, overlap=OVERLAP)
        two_pass = tiled_vae_decode(vae, latents, tile=TILE, overlap=OVERLAP, statistics="two-pass")
        per_tile = _per_tile(vae, latents)
    assert tiled.shape == full.shape == (1, 3, SHAPE[0] * 8, SHAPE[1] * 8)
    error = (tiled - full).abs().mean().item()
    # Closer to the untiled decode than the earlier two-pass statistics and than per-tile ones.
    assert error < 0.08
    assert error < (two_pass - full).abs().mean().item()
    assert error < (per_tile - full).abs().mean().item()
    # No tile stands out in tone (a seam): far less than with per-tile statistics.
    assert _tone_steps(tiled - full) < 0.8 * _tone_steps(per_tile - full)


def test_tiled_encode_matches_the_untiled_encode(tiny_pipeline: SpaSemSRPipeline) -> None:
    vae = tiny_pipeline.vae
    scale = vae.config.scaling_factor
    with torch.no_grad():
        image = _untiled(vae, _smooth_latents()).clamp(-1, 1)
        full = vae.encode(image).latent_dist.mode() * scale
        tiled = tiled_vae_encode(vae, image, tile=TILE, overlap=OVERLAP)
        two_pass = tiled_vae_encode(vae, image, tile=TILE, overlap=OVERLAP, statistics="two-pass")
    assert tiled.shape == full.shape
    error = (tiled - full).abs().mean()
    assert error < 0.15 * full.abs().mean()
    assert error < (two_pass - full).abs().mean()


def test_each_tile_goes_through_the_decoder_once_in_batches(
    tiny_pipeline: SpaSemSRPipeline,
) -> None:
    vae = tiny_pipeline.vae
    inputs: list[tuple[int, ...]] = []

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        inputs.append(tuple(args[0].shape))

    handle = vae.decoder.register_forward_pre_hook(record)
    try:
        with torch.no_grad():
            tiled_vae_decode(vae, _smooth_latents(), tile=TILE, overlap=OVERLAP, batch_size=5)
    finally:
        handle.remove()
    tiles = len(tile_grid(*SHAPE, TILE, OVERLAP))
    assert tiles == 12
    # The statistics pass: one mosaic of 4 x 4 blocks of 8 cells (a quarter of a 16-cell tile is
    # below the smallest block); then the 12 tiles in batches of 5, 5, 2.
    assert inputs == [(1, 4, 32, 32), (5, 4, 16, 16), (5, 4, 16, 16), (2, 4, 16, 16)]


def test_the_batch_size_changes_nothing_but_speed(tiny_pipeline: SpaSemSRPipeline) -> None:
    vae = tiny_pipeline.vae
    latents = _smooth_latents()
    with torch.no_grad():
        one = tiled_vae_decode(vae, latents, tile=TILE, overlap=OVERLAP, batch_size=1)
        five = tiled_vae_decode(vae, latents, tile=TILE, overlap=OVERLAP, batch_size=5)
        everything = tiled_vae_decode(vae, latents, tile=TILE, overlap=OVERLAP, batch_size=12)
    torch.testing.assert_close(five, one, atol=1e-4, rtol=0)
    torch.testing.assert_close(everything, one, atol=1e-4, rtol=0)


def test_images_of_a_batch_keep_their_own_statistics(tiny_pipeline: SpaSemSRPipeline) -> None:
    """Two images decoded together: each is what it would be alone (statistics per sample)."""
    vae = tiny_pipeline.vae
    first, second = _smooth_latents(), _noise_latents()
    with torch.no_grad():
        both = tiled_vae_decode(vae, torch.cat([first, second]), tile=TILE, overlap=OVERLAP)
        alone = [tiled_vae_decode(vae, z, tile=TILE, overlap=OVERLAP) for z in (first, second)]
    torch.testing.assert_close(both, torch.cat(alone), atol=1e-4, rtol=0)


def test_a_latent_within_the_statistics_pass_is_decoded_untiled(
    tiny_pipeline: SpaSemSRPipeline,
) -> None:
    """No more cells than four tiles: the untiled decode has that memory, and is exact."""
    vae = tiny_pipeline.vae
    latents = _smooth_latents()[..., :32, :32]
    with torch.no_grad():
        assert torch.equal(tiled_vae_decode(vae, latents, tile=TILE), _untiled(vae, latents))


def test_channels_last_is_kept_through_the_shared_norms(tiny_pipeline: SpaSemSRPipeline) -> None:
    vae = copy.deepcopy(tiny_pipeline.vae).to(memory_format=torch.channels_last)
    layouts: list[bool] = []

    def record(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if output.ndim == 4:
            layouts.append(output.is_contiguous(memory_format=torch.channels_last))

    handles = [
        m.register_forward_hook(record)
        for m in vae.decoder.modules()
        if isinstance(m, nn.GroupNorm)
    ]
    latents = _smooth_latents()
    try:
        with torch.no_grad():
            tiled = tiled_vae_decode(vae, latents, tile=TILE, overlap=OVERLAP)
    finally:
        for handle in handles:
            handle.remove()
    assert layouts and all(layouts)
    with torch.no_grad():
        plain = tiled_vae_decode(tiny_pipeline.vae, latents, tile=TILE, overlap=OVERLAP)
    torch.testing.assert_close(tiled, plain, atol=1e-4, rtol=1e-4)


def _stats_of(norm: nn.GroupNorm, x: torch.Tensor) -> GroupStats:
    stats: GroupStats = {}
    with recorded_group_norm_stats(norm, stats), torch.no_grad():
        norm(x)
    return stats


def test_shared_norm_in_bfloat16_is_group_norm_to_bfloat16_rounding() -> None:
    """Half-precision activations are normalised in float32 arithmetic and written in bf16, in
    their own layout, for one image (batch norm) and for several (scale and shift)."""
    norm = nn.GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    for samples in (1, 2):
        x = torch.randn(samples, 8, 6, 5) * 3 + 5  # a large mean: no cancellation allowed
        reference = F.group_norm(x, 4, norm.weight, norm.bias, norm.eps)
        stats = _stats_of(norm, x)
        shared = SharedNorm.of(norm, *stats[""])
        half = x.bfloat16().to(memory_format=torch.channels_last)
        # Two tiles of the same image in one batch (tile-major): each gets the same statistics.
        output = shared(torch.cat([half, half]))
        assert output.dtype == torch.bfloat16
        assert output.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(output.float(), torch.cat([reference, reference]),
                                   atol=0.05, rtol=0.02)  # fmt: skip


def test_shared_norms_compile_whole_and_once(tiny_pipeline: SpaSemSRPipeline) -> None:
    """Dynamo traces the decoder with shared norms without a graph break (``fullgraph``), and a
    second image's statistics reuse the compiled graph (no recompilation per image)."""
    from torch._dynamo.utils import counters

    vae = copy.deepcopy(tiny_pipeline.vae)
    torch.compiler.reset()
    counters.clear()
    compiled = torch.compile(vae.decoder, backend="aot_eager", fullgraph=True)
    tiles = _smooth_latents()[..., :16, :16].repeat(2, 1, 1, 1)
    for image in (_smooth_latents(), _noise_latents()):
        stats: GroupStats = {}
        with torch.no_grad():
            with recorded_group_norm_stats(vae.decoder, stats):
                vae.decoder(mosaic(image, side=32, block=4))
            with shared_group_norm_stats(vae.decoder, stats):
                torch.testing.assert_close(compiled(tiles), vae.decoder(tiles))  # type: ignore[no-untyped-call]
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    torch.compiler.reset()


def test_mosaic_keeps_full_resolution_blocks_spread_over_the_input() -> None:
    x = torch.arange(40 * 36, dtype=torch.float32).reshape(1, 1, 40, 36)
    tiled = mosaic(x, side=16, block=4)
    assert tiled.shape == (1, 1, 16, 16)
    assert torch.equal(tiled[..., :4, :4], x[..., :4, :4])  # first block: the top-left corner
    assert torch.equal(tiled[..., -4:, -4:], x[..., -4:, -4:])  # last: flush with the end
    assert torch.equal(tiled[..., 4:8, :4], x[..., 12:16, :4])  # spread evenly: (40 - 4) / 3
    # Block starts and sides on a multiple (an encoder's pixels per latent cell).
    image = torch.randn(1, 3, 200, 120)
    blocks = mosaic(image, side=64, block=16, multiple=8)
    assert blocks.shape == (1, 3, 64, 64)
    assert torch.equal(blocks[..., 16:32, :16], image[..., 56:72, :16])  # 184 // 3 = 61 -> 56
    small = torch.randn(1, 4, 8, 8)
    assert mosaic(small, side=16, block=4) is small


def test_unknown_statistics_are_refused(tiny_pipeline: SpaSemSRPipeline) -> None:
    assert STATISTICS == ("mosaic", "two-pass")
    with pytest.raises(ValueError, match="statistics"):
        tiled_vae_decode(tiny_pipeline.vae, _smooth_latents(), tile=TILE, statistics="downsampled")


def test_tiled_vae_runs_on_the_meta_device() -> None:
    """The benchmark counts FLOPs from shapes alone: the tiled path must not need values."""
    with torch.device("meta"):
        vae = AutoencoderKL(**TINY.vae)
    latents = torch.empty(1, 4, *SHAPE, device="meta")
    decoded = tiled_vae_decode(vae, latents, tile=TILE, overlap=OVERLAP)
    assert decoded.shape == (1, 3, SHAPE[0] * 8, SHAPE[1] * 8) and decoded.is_meta
    encoded = tiled_vae_encode(vae, decoded, tile=TILE, overlap=OVERLAP)
    assert encoded.shape == (1, 4, *SHAPE)
