"""The shipped vocabulary and the CLIP tagger at tiny size."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.grounding import SpaSemSRGrounder
from model.grounding.tagger import TaggerSettings, TagVocabulary, merge_tags

from .conftest import natural_image


def test_shipped_vocabulary_has_several_hundred_unique_tags_in_sections() -> None:
    vocabulary = TagVocabulary.default()
    assert len(vocabulary.tags) >= 300
    assert set(vocabulary.sections) == {"scene", "object", "material"}
    assert "seaside landscape" in vocabulary.scene_tags
    assert vocabulary.section_of("sky") == "object"
    assert vocabulary.section_of("brick") == "material"
    assert all(tag == tag.strip().lower() and tag for tag in vocabulary.tags)


def test_vocabulary_parsing_saving_and_validation(tmp_path: Path) -> None:
    parsed = TagVocabulary.from_lines(
        ["# a header comment line", "# scene", "Beach", "", "# object", "sky", "SKY", "dog"]
    )
    assert parsed.tags == ("beach", "sky", "dog")
    assert parsed.sections == ("scene", "object", "object")
    parsed.save(tmp_path / "vocabulary.txt")
    assert TagVocabulary.from_file(tmp_path / "vocabulary.txt") == parsed
    with pytest.raises(ValueError, match="at least one"):
        TagVocabulary(())
    with pytest.raises(ValueError, match="unique"):
        TagVocabulary(("a", "a"))


def test_merge_tags_puts_hints_first_and_respects_the_limit() -> None:
    assert merge_tags(["Zebra ", "sky"], ["sky", "tree", "dog", "cat"], limit=4) == (
        "zebra",
        "sky",
        "tree",
        "dog",
    )
    # Hints are never cut, even past the limit.
    assert merge_tags(["a", "b", "c"], ["d"], limit=2) == ("a", "b", "c")


def test_tagger_scores_form_a_distribution_and_settings_apply(
    tiny_grounder: SpaSemSRGrounder,
) -> None:
    tagger = tiny_grounder.tagger
    image = natural_image(48)
    probs = tagger.probabilities(image)
    assert probs.shape == (len(tagger.vocabulary.tags),)
    assert torch.isclose(probs.sum(), torch.tensor(1.0), atol=1e-5)
    original = tagger.settings
    try:
        tagger.settings = TaggerSettings(top_k=5, threshold=0.0)
        scores = tagger.tag(image)
        assert len(scores.objects) == 5
        values = [s for _, s in scores.objects]
        assert values == sorted(values, reverse=True)
        assert all(tag not in tagger.vocabulary.scene_tags for tag, _ in scores.objects)
        assert len(scores.scene) == 1 and scores.scene[0][0] in tagger.vocabulary.scene_tags
        best_scene = max(
            tagger.vocabulary.scene_tags,
            key=lambda t: float(probs[tagger.vocabulary.tags.index(t)]),
        )
        assert scores.scene[0][0] == best_scene
        # Nothing passes a threshold of 1: only the guaranteed best tags remain.
        tagger.settings = replace(tagger.settings, threshold=1.0, min_tags=2)
        assert len(tagger.tag(image).objects) == 2
    finally:
        tagger.settings = original


def test_tagger_handles_any_image_size(tiny_grounder: SpaSemSRGrounder) -> None:
    for size in ((1, 1), (5, 300), (64, 64)):
        scores = tiny_grounder.tagger.tag(Image.new("RGB", size, (30, 90, 200)))
        assert 1 <= len(scores.objects) <= tiny_grounder.tagger.settings.top_k
