"""Degradation estimates order correctly on generated images; the caption names what dominates."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
from PIL import Image

from model.grounding.degradation import (
    CaptionThresholds,
    DegradationEstimates,
    compose_caption,
    estimate_degradations,
    scene_phrase,
)

from .conftest import add_noise, blur, jpeg, natural_image


def strictly_increasing(values: list[float]) -> bool:
    return all(a < b for a, b in pairwise(values))


@pytest.mark.parametrize("size", [32, 96, 200])
def test_more_noise_gives_a_higher_noise_estimate(size: int) -> None:
    base = natural_image(size)
    estimates = [estimate_degradations(add_noise(base, s)).noise_sigma for s in (0, 4, 10, 25)]
    assert strictly_increasing(estimates), estimates


def test_noise_sigma_is_calibrated_on_a_flat_image() -> None:
    flat = Image.new("RGB", (128, 128), (128, 128, 128))
    estimate = estimate_degradations(add_noise(flat, 10.0)).noise_sigma
    assert estimate == pytest.approx(10.0, rel=0.1)
    assert estimate_degradations(flat).noise_sigma == 0.0


@pytest.mark.parametrize("size", [32, 96, 200])
def test_stronger_blur_gives_a_higher_blur_estimate(size: int) -> None:
    base = natural_image(size)
    estimates = [estimate_degradations(blur(base, r)) for r in (0, 1, 2, 4)]
    assert strictly_increasing([e.blur for e in estimates]), estimates
    # The Laplacian variance is a sharpness figure: it falls as blur grows.
    sharpness = [e.laplacian_variance for e in estimates]
    assert all(a > b for a, b in pairwise(sharpness)), sharpness


@pytest.mark.parametrize("size", [96, 200])
def test_lower_jpeg_quality_gives_higher_blockiness(size: int) -> None:
    base = natural_image(size)
    values = [estimate_degradations(jpeg(base, q)).blockiness for q in (95, 60, 30, 10)]
    assert strictly_increasing(values), values
    assert estimate_degradations(base).blockiness < 0.1


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (16, 16), (7, 40)])
def test_tiny_images_give_finite_estimates(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    estimates = estimate_degradations(image)
    assert all(math.isfinite(v) for v in estimates.as_dict().values())
    assert (estimates.height, estimates.width) == size
    assert 0.0 <= estimates.blur <= 1.0


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_other_modes_converted_to_rgb_match_their_rgb_version(mode: str) -> None:
    base = add_noise(natural_image(48), 6)
    converted = base.convert(mode) if mode != "I;16" else base.convert("L").convert(mode)
    reference = estimate_degradations(converted.convert("RGB"))
    direct = estimate_degradations(converted)  # the estimator converts PIL images itself
    assert direct == reference


def test_uint8_arrays_and_float_tensors_agree() -> None:
    import torch

    image = add_noise(natural_image(40), 8)
    array = np.array(image)
    tensor = torch.from_numpy(array).permute(2, 0, 1).double() / 255.0
    from_pil = estimate_degradations(image).as_dict()
    for other in (estimate_degradations(array), estimate_degradations(tensor)):
        for key, value in other.as_dict().items():
            assert value == pytest.approx(from_pil[key], rel=1e-9, abs=1e-9)


def test_caption_names_the_dominant_degradation() -> None:
    base = natural_image(96)
    noisy = compose_caption(estimate_degradations(add_noise(base, 20)), "a garden")
    blurry = compose_caption(estimate_degradations(blur(base, 3)), "a garden")
    blocky = compose_caption(estimate_degradations(jpeg(base, 8)), "a garden")
    assert noisy.startswith("A noisy") and "noise" in noisy.split("exhibits")[1]
    assert "compression" not in noisy
    assert "blurred details" in blurry and "noise" not in blurry
    first_symptom = blocky.split("exhibits")[1]
    assert first_symptom.strip().startswith(("compression", "strong compression")), blocky
    for caption in (noisy, blurry, blocky):
        assert "low-resolution image of a garden." in caption


def test_caption_orders_degradations_by_severity_and_handles_clean_images() -> None:
    estimates = DegradationEstimates(
        noise_sigma=5.0, blur=0.6, laplacian_variance=10.0, blockiness=1.5, width=800, height=600
    )
    caption = compose_caption(estimates, "seaside landscape", CaptionThresholds())
    assert caption == (
        "A compressed, blurry, noisy image of seaside landscape. The image exhibits strong "
        "compression artifacts, blurred details and visible noise."
    )
    clean = DegradationEstimates(
        noise_sigma=0.5, blur=0.2, laplacian_variance=500.0, blockiness=0.0, width=64, height=64
    )
    assert compose_caption(clean, "") == (
        "A clean, low-resolution image of a scene. The image shows no strong noise, blur or "
        "compression artifacts."
    )


def test_scene_phrase_joins_unique_tags() -> None:
    assert scene_phrase(["sky", "water", "sky", "sand", "cliff"]) == "sky, water and sand"
    assert scene_phrase(["sky"]) == "sky"
    assert scene_phrase([]) == ""
