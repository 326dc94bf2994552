"""Optional SAM masks: the masker at tiny size, the run-length masks, the grounder's flag."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from model.configs.grounding import build_tiny_box_masker, build_tiny_grounder
from model.grounding import BoxMasker, SpaSemSRGrounder
from model.grounding.grounder import MASK_STAGE, STAGES, WHOLE_IMAGE
from model.grounding.masks import grid_size
from model.pipeline.prompt import GroundedPrompt, Mask

from .conftest import add_noise, natural_image

BOXES = ((0.1, 0.2, 0.6, 0.9), WHOLE_IMAGE, (0.5, 0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def masker() -> BoxMasker:
    return build_tiny_box_masker(seed=0)


@pytest.fixture(scope="module")
def masked_grounder(tiny_grounder: SpaSemSRGrounder, masker: BoxMasker) -> SpaSemSRGrounder:
    """The session's tiny grounder with the tiny SAM and the flag on (no second full build)."""
    return SpaSemSRGrounder(
        drm=tiny_grounder.drm,
        tagger=tiny_grounder.tagger,
        detector=tiny_grounder.detector,
        masker=masker,
        config=replace(tiny_grounder.config, masks=True),
    )


# ---------------------------------------------------------------- run-length masks


def test_rle_follows_coco_column_major_order_starting_with_background() -> None:
    assert Mask.encode(np.array([[0, 1], [1, 1]])).counts == (1, 3)
    assert Mask.encode(np.array([[1, 0], [0, 0]])).counts == (0, 1, 3)
    assert Mask.encode(np.zeros((2, 3), bool)) == Mask(size=(2, 3), counts=(6,))
    assert Mask.encode(np.ones((2, 3), bool)).to_json() == {"size": [2, 3], "counts": [0, 6]}


@settings(max_examples=60, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 12), st.integers(1, 12))))
def test_rle_round_trips(mask: np.ndarray) -> None:
    encoded = Mask.encode(mask)
    assert encoded.size == mask.shape
    decoded = encoded.decode()
    assert decoded.dtype == np.bool_ and np.array_equal(decoded, mask)
    assert Mask.from_json(json.loads(json.dumps(encoded.to_json()))) == encoded


def test_masks_are_validated() -> None:
    with pytest.raises(ValueError, match="sum to"):
        Mask(size=(2, 2), counts=(1, 2))
    with pytest.raises(ValueError, match="sum to"):
        Mask(size=(1, 2), counts=(3, -1))
    with pytest.raises(ValueError, match="positive"):
        Mask(size=(0, 2), counts=())
    with pytest.raises(ValueError, match="2-D"):
        Mask.encode(np.zeros((2, 2, 2), bool))


def test_grounded_prompt_takes_none_or_one_mask_per_box() -> None:
    mask = Mask.encode(np.eye(4, dtype=bool))
    boxes = (WHOLE_IMAGE, (0.0, 0.0, 0.5, 0.5))
    assert GroundedPrompt(tags=("a", "b"), boxes=boxes).masks == ()
    prompt = GroundedPrompt(tags=("a", "b"), boxes=boxes, masks=(mask, mask))
    assert prompt.to_json()["masks"] == [mask.to_json(), mask.to_json()]
    assert GroundedPrompt(tags=("a",), boxes=(WHOLE_IMAGE,)).to_json()["masks"] == []
    with pytest.raises(ValueError, match="1 masks for 2 boxes"):
        GroundedPrompt(tags=("a", "b"), boxes=boxes, masks=(mask,))
    with pytest.raises(ValueError, match="1 masks for 0 boxes"):
        GroundedPrompt(masks=(mask,))


# ---------------------------------------------------------------- the masker


def test_one_binary_mask_per_box_on_the_fixed_grid(masker: BoxMasker) -> None:
    image = natural_image(96).resize((120, 80))
    masks = masker.masks(image, BOXES)
    assert len(masks) == len(BOXES)
    assert grid_size(120, 80, 64) == (43, 64)  # longest side 64, aspect kept
    for mask in masks:
        assert mask.size == (43, 64)
        assert mask.decode().dtype == np.bool_
    assert all(m.size == (16, 24) for m in masker.masks(image, BOXES, grid=24))
    assert masker.masks(image, ()) == ()
    tall = masker.masks(Image.new("RGB", (30, 90), (200, 10, 10)), BOXES[:1])
    assert tall[0].size == (64, 21)


def test_grid_cells_are_the_majority_of_the_full_size_mask(masker: BoxMasker) -> None:
    image = add_noise(natural_image(128), 10).resize((128, 64))
    full = masker.full_size_masks(image, BOXES).numpy()
    assert full.shape == (3, 64, 128) and full.dtype == np.bool_
    # SAM's random-weight masks are not trivially empty or full everywhere.
    assert 0 < full.sum() < full.size
    small = masker.masks(image, BOXES, grid=32)  # 2x4-pixel cells
    for mask, big in zip(small, full, strict=True):
        cells = big.reshape(16, 4, 32, 4).mean(axis=(1, 3)) >= 0.5
        assert np.array_equal(mask.decode(), cells)


def test_tiny_sam_saves_and_loads_back(masker: BoxMasker, tmp_path: Path) -> None:
    folder = masker.save_pretrained(tmp_path / "sam")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    loaded = BoxMasker.from_pretrained(folder)
    assert loaded.model.config.to_dict()["vision_config"]["image_size"] == 64
    image = natural_image(64, seed=3)
    assert loaded.masks(image, BOXES) == masker.masks(image, BOXES)


# ---------------------------------------------------------------- the grounder's flag


def test_flag_on_gives_masks_and_their_timing(masked_grounder: SpaSemSRGrounder) -> None:
    result = masked_grounder.ground(add_noise(natural_image(64), 20))
    assert tuple(result.timings) == ("drm", "tagger", "detector", MASK_STAGE, "caption")
    assert result.timings[MASK_STAGE] >= 0
    prompt = result.prompt
    assert len(prompt.masks) == len(prompt.boxes) > 0
    # The clean estimate is the x4 DRM output: 256x256, so a 64x64 grid.
    assert all(mask.size == (64, 64) for mask in prompt.masks)
    document = json.loads(json.dumps(prompt.to_json()))
    assert [Mask.from_json(m) for m in document["masks"]] == list(prompt.masks)

    # Hinted tags left with whole-image boxes get masks too.
    strict = masked_grounder.with_config(
        detector=replace(masked_grounder.config.detector, box_threshold=1.0), mask_grid=16
    )
    hinted = strict.ground(natural_image(48), tags_hint=("sky", "boat")).prompt
    assert hinted.boxes == (WHOLE_IMAGE, WHOLE_IMAGE)
    assert [m.size for m in hinted.masks] == [(16, 16), (16, 16)]


def test_flag_off_gives_no_masks(
    tiny_grounder: SpaSemSRGrounder, masked_grounder: SpaSemSRGrounder
) -> None:
    image = natural_image(40)
    plain = tiny_grounder.ground(image)
    assert tiny_grounder.config.masks is False and tiny_grounder.masker is None
    assert plain.prompt.masks == () and tuple(plain.timings) == STAGES
    off = masked_grounder.with_config(masks=False).ground(image)
    assert off.prompt.masks == () and MASK_STAGE not in off.timings
    # The masks are an addition: the rest of the prompt is the same with the flag on.
    on = masked_grounder.ground(image).prompt
    assert replace(on, masks=()) == plain.prompt


def test_flag_needs_a_masker(tiny_grounder: SpaSemSRGrounder) -> None:
    with pytest.raises(ValueError, match="no SAM masker"):
        tiny_grounder.with_config(masks=True)


def test_masked_folder_round_trips(masked_grounder: SpaSemSRGrounder, tmp_path: Path) -> None:
    folder = masked_grounder.save_pretrained(tmp_path / "grounder")
    document = json.loads((folder / "grounder_config.json").read_text())
    assert document["components"]["sam"] == "sam" and document["config"]["masks"] is True
    assert (folder / "sam" / "model.safetensors").is_file()
    loaded = SpaSemSRGrounder.from_pretrained(folder)
    assert loaded.config == masked_grounder.config and loaded.masker is not None
    image = add_noise(natural_image(40), 5)
    expected = masked_grounder.ground(image, tags_hint=("dog",)).prompt
    assert expected.masks
    assert loaded.ground(image, tags_hint=("dog",)).prompt == expected

    # A config asking for masks without a sam component is refused at load time.
    document["components"]["sam"] = None
    (folder / "grounder_config.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="names no sam component"):
        SpaSemSRGrounder.from_pretrained(folder)


def test_tiny_builder_turns_the_flag_on_only_when_asked(tiny_grounder: SpaSemSRGrounder) -> None:
    built = build_tiny_grounder(seed=0, masks=True)
    assert built.config.masks is True and built.masker is not None
    image = natural_image(32)
    result = built.ground(image)
    assert len(result.prompt.masks) == len(result.prompt.boxes)
    # Same seed, same other components: only the masks differ from the plain tiny grounder.
    assert replace(result.prompt, masks=()) == tiny_grounder.ground(image).prompt
