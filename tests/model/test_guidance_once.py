"""Per-image visual guidance: the semantic encoder (SAM) runs once per image, whatever the number
of tiles, and each tile reads the whole image's map at its own latent cells."""

from __future__ import annotations

import torch
from PIL import Image

from model.blocks.encoders import encode_semantic_map, semantic_features
from model.configs.spasemsr import build_tiny_pipeline
from model.evaluation.photos import load_photo
from model.pipeline.diffusion import SpaSemSRPipeline, _Upsampled, cell_fractions


def photo(side: int) -> Image.Image:
    return load_photo("astronaut").resize((side, side))


def forwards_of(module: torch.nn.Module, pipeline: SpaSemSRPipeline, **call: object) -> int:
    calls = 0

    def count(*_: object) -> None:
        nonlocal calls
        calls += 1

    hook = module.register_forward_pre_hook(count)
    try:
        pipeline(photo(48), scale=2, num_inference_steps=1, color_fix="none", **call)  # type: ignore[arg-type]
    finally:
        hook.remove()
    return calls


def test_the_encoders_run_once_per_image_whatever_the_tiles() -> None:
    """SAM once; the image encoder over the whole image exactly as the VAE encoder (the same VAE
    tiles and statistics pass), however many denoiser tiles there are."""
    pipeline = build_tiny_pipeline(seed=0)
    tiles = len(pipeline._tiles(12, 12, 32, None))  # a 96-px output in 32-px tiles
    assert tiles > 1
    for tile_size in (32, None):
        assert forwards_of(pipeline.semantic_encoder, pipeline, tile_size=tile_size) == 1
        vae_passes = forwards_of(pipeline.vae.encoder, pipeline, tile_size=tile_size)
        assert forwards_of(pipeline.image_encoder, pipeline, tile_size=tile_size) == vae_passes


def test_a_tile_reads_its_crop_of_the_whole_image_latent() -> None:
    pipeline = build_tiny_pipeline(seed=0)
    upsampled = _Upsampled(torch.rand(1, 3, 48, 48) * 2 - 1, 2, 96, 96)
    latents = pipeline.image_latents(upsampled, tile=12)
    whole = pipeline.image_encoder(upsampled.source((torch.float32,)).whole())
    torch.testing.assert_close(latents, whole, rtol=1e-5, atol=1e-5)


def test_reading_the_map_at_cell_centres_is_the_whole_image_resize() -> None:
    """At the centres of a grid over the image, the map gives what resizing the whole image's
    features to that grid gives; a tile's cells are a window of that grid."""
    pipeline = build_tiny_pipeline(seed=0)
    image = torch.rand(1, 3, 40, 40) * 2 - 1
    whole = semantic_features(pipeline.semantic_encoder, image, size=(10, 10))
    semantic_map = encode_semantic_map(pipeline.semantic_encoder, image)
    read = semantic_map.at(cell_fractions(0, 10, 4, 40), cell_fractions(0, 10, 4, 40))
    torch.testing.assert_close(read, whole, rtol=1e-5, atol=1e-5)
    window = semantic_map.at(cell_fractions(3, 5, 4, 40), cell_fractions(6, 4, 4, 40))
    torch.testing.assert_close(window, whole[..., 3:8, 6:10], rtol=1e-5, atol=1e-5)


def test_cells_in_the_padding_mirror_back_into_the_image() -> None:
    fractions = cell_fractions(0, 6, 8, 40)  # 48 padded pixels over 40 real ones
    assert torch.allclose(fractions[:5], (torch.arange(5, dtype=torch.float64) + 0.5) / 5)
    assert float(fractions[5]) == (2 * 40 - 44) / 40
