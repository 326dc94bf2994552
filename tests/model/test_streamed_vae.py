# mypy: disallow-untyped-calls=False
"""The streamed tiled VAE (issue 17, flat memory): the encoder reads the upsampled image region by
region, the decoder hands bands of finished rows to the colour fix and the output, and neither
ever holds an image plane at full output resolution; the results are those of the whole-image
path, checked on a photo with the tiny VAE."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from model.pipeline.diffusion import (
    SpaSemSRPipeline,
    _Output,
    _OutputStream,
    _Upsampled,
    stream_output,
)
from model.pipeline.tiling import (
    feather_weights,
    mosaic_group_norm_stats,
    shared_group_norm_stats,
    tile_grid,
    tiled_apply,
    tiled_vae_decode,
    tiled_vae_decode_stream,
    tiled_vae_encode,
)

# The astronaut at 100 x 90, x4: 400 x 360 output padded to 400 x 368, 50 x 46 latent cells in
# 16-cell tiles with 4 of overlap (4 x 4 tiles, more cells than the untiled limit).
LOW_RES = (100, 90)
PADDED = (400, 368)
TILE, OVERLAP = 16, 4


def _astronaut_upsampled() -> _Upsampled:
    photo = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1)[None].float()
    low_res = F.interpolate(photo / 127.5 - 1.0, size=LOW_RES, mode="area")
    return _Upsampled(low_res, 4, *PADDED)


@pytest.fixture(scope="module")
def astronaut_latents(tiny_pipeline: SpaSemSRPipeline) -> torch.Tensor:
    source = _astronaut_upsampled().source((torch.float32,))
    return tiled_vae_encode(tiny_pipeline.vae, source, tile=TILE, overlap=OVERLAP)


def test_encoding_regions_equals_encoding_the_whole_image(
    tiny_pipeline: SpaSemSRPipeline, astronaut_latents: torch.Tensor
) -> None:
    upsampled = _astronaut_upsampled()
    whole = upsampled.source((torch.float32,)).whole()
    assert whole.shape == (1, 3, *PADDED)
    for statistics in ("mosaic", "two-pass"):
        kwargs: dict[str, Any] = {"tile": TILE, "overlap": OVERLAP, "statistics": statistics}
        streamed = tiled_vae_encode(tiny_pipeline.vae, upsampled.source((torch.float32,)), **kwargs)
        torch.testing.assert_close(
            streamed, tiled_vae_encode(tiny_pipeline.vae, whole, **kwargs), rtol=0, atol=1e-6
        )
    assert astronaut_latents.shape == (1, 4, PADDED[0] // 8, PADDED[1] // 8)


def test_banded_blending_equals_one_whole_image_accumulator(
    tiny_pipeline: SpaSemSRPipeline, astronaut_latents: torch.Tensor
) -> None:
    """The decode as it was before streaming: every tile into one full-size accumulator."""
    vae = tiny_pipeline.vae

    def run(z: torch.Tensor) -> torch.Tensor:
        decoded: torch.Tensor = vae.decode(z / vae.config.scaling_factor).sample
        return decoded

    latents, ramp = astronaut_latents, OVERLAP * 8
    tiles = tile_grid(latents.shape[-2], latents.shape[-1], TILE, OVERLAP)
    with torch.no_grad():
        stats = mosaic_group_norm_stats(run, vae.decoder, latents, side=32, block=8)
        out = torch.zeros(1, 3, PADDED[0], PADDED[1])
        total = torch.zeros(1, 1, *PADDED)
        with shared_group_norm_stats(vae.decoder, stats):
            for tile in tiles:
                target = tile.scaled(8)
                weight = feather_weights(target.height, target.width, ramp)
                rows, cols = target.slices
                out[..., rows, cols] += run(latents[..., tile.slices[0], tile.slices[1]]) * weight
                total[..., rows, cols] += weight
        banded = tiled_apply(
            run, vae.decoder, latents, tiles=tiles, factor=8, ramp=ramp, stats=stats
        )
        decoded = tiled_vae_decode(vae, latents, tile=TILE, overlap=OVERLAP)
    torch.testing.assert_close(banded, out / total, rtol=0, atol=1e-6)
    torch.testing.assert_close(decoded, out / total, rtol=0, atol=1e-6)


def test_blending_out_of_raster_order_is_the_same() -> None:
    """Bands are handed on only once no tile still to come touches them, whatever the order."""
    norm = nn.GroupNorm(4, 8)
    x = torch.randn(1, 8, 37, 29, generator=torch.Generator().manual_seed(0))
    tiles = tile_grid(37, 29, 10, 3)
    with torch.no_grad():
        raster = tiled_apply(norm, nn.Identity(), x, tiles=tiles, factor=1, ramp=3)
        reverse = tiled_apply(norm, nn.Identity(), x, tiles=tiles[::-1], factor=1, ramp=3)
    torch.testing.assert_close(reverse, raster, rtol=0, atol=1e-6)


@pytest.mark.parametrize("color_fix", ["none", "adain", "wavelet"])
def test_streamed_decode_and_colour_fix_equal_the_whole_image_path(
    tiny_pipeline: SpaSemSRPipeline, astronaut_latents: torch.Tensor, color_fix: str
) -> None:
    vae, upsampled = tiny_pipeline.vae, _astronaut_upsampled()
    out_h, out_w = upsampled.out_h, upsampled.out_w
    bands: list[tuple[int, int]] = []
    streamed_pt, streamed_pil = _Output(out_h, out_w, "pt"), _Output(out_h, out_w, "pil")
    consumers = [_OutputStream(upsampled, color_fix, o) for o in (streamed_pt, streamed_pil)]

    def emit(top: int, rows: torch.Tensor) -> None:
        bands.append((top, rows.shape[-2]))
        for consumer in consumers:
            consumer.add(top, rows)

    whole_pt, whole_pil = _Output(out_h, out_w, "pt"), _Output(out_h, out_w, "pil")
    with torch.no_grad():
        tiled_vae_decode_stream(vae, astronaut_latents, emit, tile=TILE, overlap=OVERLAP)
        decoded = tiled_vae_decode(vae, astronaut_latents, tile=TILE, overlap=OVERLAP)
    for whole in (whole_pt, whole_pil):
        stream_output(decoded, upsampled, color_fix, whole)

    # Consecutive bands covering every row, none of them the whole image.
    assert len(bands) > 2 and bands[0][0] == 0
    assert all(top + rows == after for (top, rows), (after, _) in itertools.pairwise(bands))
    assert sum(rows for _, rows in bands) == PADDED[0]
    assert max(rows for _, rows in bands) <= TILE * 8
    expected, result = whole_pt.result(), streamed_pt.result()
    assert isinstance(expected, torch.Tensor) and isinstance(result, torch.Tensor)
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-5)
    image, reference = streamed_pil.result(), whole_pil.result()
    assert isinstance(image, list) and isinstance(reference, list)
    difference = np.abs(np.asarray(image[0]).astype(int) - np.asarray(reference[0]).astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3  # rounding ties at most


@pytest.mark.parametrize("color_fix", ["none", "adain", "wavelet"])
def test_bands_of_any_height_give_the_whole_image_result(color_fix: str) -> None:
    """Bands thinner than the wavelet's margin, and one across the last output row (600 of the
    640 decoded): the padding rows after it are dropped, the result is the whole image's."""
    generator = torch.Generator().manual_seed(1)
    upsampled = _Upsampled(torch.rand(1, 3, 150, 175, generator=generator) * 2 - 1, 4, 640, 704)
    decoded = torch.randn(1, 3, 640, 704, generator=generator)
    whole, banded = _Output(600, 700, "pt"), _Output(600, 700, "pt")
    stream_output(decoded, upsampled, color_fix, whole)
    stream = _OutputStream(upsampled, color_fix, banded)
    for top, bottom in itertools.pairwise([0, 10, 20, 250, 590, 610, 640]):
        stream.add(top, decoded[..., top:bottom, :])
    result, expected = banded.result(), whole.result()
    assert isinstance(result, torch.Tensor) and isinstance(expected, torch.Tensor)
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-5)


def test_bands_must_arrive_in_order() -> None:
    upsampled = _astronaut_upsampled()
    stream = _OutputStream(upsampled, "wavelet", _Output(upsampled.out_h, upsampled.out_w, "pt"))
    stream.add(0, torch.zeros(1, 3, 100, PADDED[1]))
    with pytest.raises(ValueError, match="arrived"):
        stream.add(120, torch.zeros(1, 3, 100, PADDED[1]))


class _FullPlanes(TorchDispatchMode):
    """Records the shape of every tensor an op makes whose last two sides reach ``height x width``
    (an image plane at full output resolution, whatever its dtype or channels)."""

    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        self.height, self.width = height, width
        self.found: list[tuple[str, tuple[int, ...]]] = []
        self.ops = 0

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in pytree.tree_leaves(out):
            full = isinstance(t, torch.Tensor) and t.ndim >= 2 and t.shape[-2] >= self.height
            if full and t.shape[-1] >= self.width:
                self.found.append((str(func), tuple(t.shape)))
        return out


def test_a_multi_tile_job_never_makes_a_full_resolution_plane(
    tiny_pipeline: SpaSemSRPipeline,
) -> None:
    """Beyond the model, a job's only full-size buffer is its output (a PIL image here): no op of
    the whole job, the VAE encode and decode included, makes a tensor with an image plane of the
    output's size (before streaming: the encoder's input canvas and the decoded image)."""
    photo = Image.fromarray(skimage.data.astronaut()).resize((96, 96), Image.Resampling.LANCZOS)
    # 384² output in 128-px tiles: 16-cell VAE tiles over a 48-cell latent, 4 x 4 of them.
    planes = _FullPlanes(384, 384)
    with planes:
        result = tiny_pipeline(
            photo,
            scale=4,
            num_inference_steps=1,
            tile_size=128,
            generator=torch.Generator().manual_seed(0),
        )
    images = result.images
    assert isinstance(images, list) and images[0].size == (384, 384)
    assert planes.ops > 1000  # the mode saw the job's ops
    assert not planes.found, planes.found[:5]


def test_a_photo_is_held_as_8_bit_pixels_and_read_as_the_float_image_it_stands_for(
    tiny_pipeline: SpaSemSRPipeline,
) -> None:
    photo = Image.fromarray(skimage.data.astronaut()).resize(LOW_RES[::-1])
    held = tiny_pipeline._to_tensor(photo)
    assert held.dtype == torch.uint8  # a quarter of float32's bytes for the job's whole run
    as_float = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 255.0).permute(2, 0, 1)
    expected = (as_float[None] * 2.0 - 1.0).clamp(-1.0, 1.0)  # how a float LR is held
    from_bytes, from_float = _Upsampled(held, 4, *PADDED), _Upsampled(expected, 4, *PADDED)
    for rows, cols in [(slice(0, 400), slice(0, 368)), (slice(37, 201), slice(300, 368))]:
        assert torch.equal(from_bytes.region(rows, cols), from_float.region(rows, cols))
    assert torch.equal(
        tiny_pipeline.semantic_map(held, 4).features,
        tiny_pipeline.semantic_map(expected, 4).features,
    )
