"""The captioning-model backend (BLIP) behind the same interface as the measured template."""

from __future__ import annotations

from pathlib import Path

from model.grounding import SpaSemSRGrounder
from model.grounding.captioner import BlipCaptioner, TemplateCaptioner
from model.grounding.degradation import compose_caption, estimate_degradations
from tests.model.builders import build_tiny_blip_captioner

from .conftest import add_noise, natural_image


def test_template_captioner_is_the_measured_caption() -> None:
    image = add_noise(natural_image(48), 15)
    estimates = estimate_degradations(image)
    caption = TemplateCaptioner().caption(image, estimates=estimates, scene="a meadow")
    assert caption == compose_caption(estimates, "a meadow")


def test_blip_backend_describes_the_scene_and_keeps_measured_degradations(
    tiny_grounder: SpaSemSRGrounder, tmp_path: Path
) -> None:
    captioner = build_tiny_blip_captioner(seed=0)
    image = add_noise(natural_image(48), 15)
    description = captioner.describe(image)
    assert description  # random weights still generate words from the vocabulary
    estimates = estimate_degradations(image)
    caption = captioner.caption(image, estimates=estimates, scene="ignored")
    assert caption == compose_caption(estimates, description)
    assert "noise" in caption.split("exhibits")[1]

    grounder = SpaSemSRGrounder(
        drm=tiny_grounder.drm,
        tagger=tiny_grounder.tagger,
        detector=tiny_grounder.detector,
        captioner=captioner,
        config=tiny_grounder.config,
    )
    result = grounder.ground(image)
    folder = grounder.save_pretrained(tmp_path / "with-blip")
    assert (folder / "captioner" / "captioner_config.json").is_file()
    loaded = SpaSemSRGrounder.from_pretrained(folder)
    assert isinstance(loaded.captioner, BlipCaptioner)
    assert loaded.ground(image).prompt.caption == result.prompt.caption
