"""The Grounder end to end at tiny size: stages, hints, persistence, the demo folder."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from PIL import Image

from model.configs.grounding import ensure_demo_grounder
from model.grounding import SpaSemSRGrounder
from model.grounding.grounder import STAGES, WHOLE_IMAGE
from model.pipeline.prompt import Grounder, GroundingResult

from .conftest import add_noise, jpeg, natural_image


def test_ground_returns_a_grounded_prompt_with_stage_timings(
    tiny_grounder: SpaSemSRGrounder,
) -> None:
    grounder: Grounder = tiny_grounder  # satisfies the shared protocol
    result = grounder.ground(add_noise(natural_image(64), 20))
    assert isinstance(result, GroundingResult)
    assert tuple(result.timings) == STAGES
    assert all(seconds >= 0 for seconds in result.timings.values())
    prompt = result.prompt
    assert len(prompt.tags) == len(prompt.boxes) > 0
    assert set(prompt.tags) <= set(tiny_grounder.tagger.vocabulary.tags)
    assert prompt.caption.startswith("A noisy, low-resolution image of ")
    assert prompt.estimates["noise_sigma"] > 10
    assert prompt.estimates["width"] == 64
    json.dumps(prompt.to_json())  # what the pipeline puts into the job details


def test_the_drm_output_is_what_grounding_reads(tiny_grounder: SpaSemSRGrounder) -> None:
    image = natural_image(24)
    clean = tiny_grounder.remove_degradations(image)
    assert clean.size == (96, 96)  # the tiny DRM is x4, like BSRNet / RealESRNet x4
    large = tiny_grounder.with_config(drm_max_side=16).remove_degradations(image)
    assert large.size == (64, 64)  # downscaled to 16 px in front of the DRM
    # Small tiles with the configured overlap give the same clean estimate as one pass.
    tiled = tiny_grounder.with_config(drm_tile=8).remove_degradations(image)
    assert tiled.tobytes() == clean.tobytes()


def test_tags_hint_augments_and_gets_a_box(tiny_grounder: SpaSemSRGrounder) -> None:
    strict = tiny_grounder.with_config(
        detector=tiny_grounder.config.detector.__class__(box_threshold=1.0)
    )
    result = strict.ground(natural_image(48), tags_hint=("Purple Unicorn", "sky"))
    # Nothing passes a box threshold of 1: hinted tags stay, with whole-image boxes, in hint order.
    assert result.prompt.tags == ("purple unicorn", "sky")
    assert result.prompt.boxes == (WHOLE_IMAGE, WHOLE_IMAGE)

    normal = tiny_grounder.ground(natural_image(48), tags_hint=("zebra",))
    assert normal.prompt.tags[0] == "zebra"
    assert len(set(normal.prompt.tags)) > 1  # tagger tags fill the rest


def test_caption_hint_replaces_the_scene_words_or_the_whole_caption(
    tiny_grounder: SpaSemSRGrounder,
) -> None:
    image = jpeg(natural_image(96), 8)
    scene = tiny_grounder.ground(image, caption_hint="an old harbour at dusk.")
    assert scene.prompt.caption.startswith("A compressed")
    assert "image of an old harbour at dusk. The image exhibits" in scene.prompt.caption
    assert "compression artifacts" in scene.prompt.caption

    full = tiny_grounder.with_config(caption_hint_mode="full").ground(
        image, caption_hint="My own caption."
    )
    assert full.prompt.caption == "My own caption."


def test_inputs_are_checked(tiny_grounder: SpaSemSRGrounder) -> None:
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="hint tags"):
        tiny_grounder.ground(image, tags_hint=("",))
    with pytest.raises(ValueError, match="at most"):
        tiny_grounder.ground(image, tags_hint=tuple(f"t{i}" for i in range(40)))
    with pytest.raises(ValueError, match="caption hint"):
        tiny_grounder.ground(image, caption_hint="x" * 1000)
    with pytest.raises(ValueError, match="PIL image"):
        tiny_grounder.ground("not an image")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_other_image_modes_ground(tiny_grounder: SpaSemSRGrounder, mode: str) -> None:
    result = tiny_grounder.ground(natural_image(20).convert(mode))
    assert len(result.prompt.tags) == len(result.prompt.boxes)


def test_saved_folder_loads_back_to_the_same_results(
    tiny_grounder: SpaSemSRGrounder, tiny_grounder_folder: Path
) -> None:
    layout = {p.name for p in tiny_grounder_folder.iterdir()}
    assert layout == {"grounder_config.json", "vocabulary.txt", "drm", "tagger", "detector"}
    assert (tiny_grounder_folder / "drm" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_grounder_folder / "tagger" / "model.safetensors").is_file()
    assert (tiny_grounder_folder / "detector" / "preprocessor_config.json").is_file()
    loaded = SpaSemSRGrounder.from_pretrained(tiny_grounder_folder)
    assert loaded.config == tiny_grounder.config
    image = add_noise(natural_image(40), 5)
    assert (
        loaded.ground(image, tags_hint=("dog",)).prompt
        == tiny_grounder.ground(image, tags_hint=("dog",)).prompt
    )


def test_a_published_drm_checkpoint_can_replace_the_drm_folder(
    tiny_grounder: SpaSemSRGrounder, tiny_grounder_folder: Path, tmp_path: Path
) -> None:
    import shutil

    import torch

    folder = tmp_path / "with-pth"
    shutil.copytree(tiny_grounder_folder, folder)
    assert tiny_grounder.drm is not None
    torch.save({"params_ema": tiny_grounder.drm.state_dict()}, tmp_path / "RealESRNet_x4plus.pth")
    document = json.loads((folder / "grounder_config.json").read_text())
    document["components"]["drm"] = str(tmp_path / "RealESRNet_x4plus.pth")
    (folder / "grounder_config.json").write_text(json.dumps(document))
    loaded = SpaSemSRGrounder.from_pretrained(folder)
    image = natural_image(16)
    assert (
        loaded.remove_degradations(image).tobytes()
        == tiny_grounder.remove_degradations(image).tobytes()
    )


def test_demo_folder_is_built_once_even_when_raced(tmp_path: Path) -> None:
    target = tmp_path / "demo" / "grounder"
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            # The toy DRM: this is about the race (the trained-DRM default: tests/model/realesrgan).
            results.append(ensure_demo_grounder(target, seed=0, drm="tiny"))
        except BaseException as error:  # surfaced in the assertion below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results == [target, target]
    assert sorted(p.name for p in target.parent.iterdir()) == ["grounder"]  # no temp folders left
    stamp = (target / "grounder_config.json").stat().st_mtime_ns
    assert ensure_demo_grounder(target, drm="tiny") == target
    assert (target / "grounder_config.json").stat().st_mtime_ns == stamp
    SpaSemSRGrounder.from_pretrained(target).ground(natural_image(16))
