"""``SpaSemSRUpscaler`` on the saved tiny pipeline: the worker's upscaler protocol, grounding
sources, progress and cancellation, and the demo folder."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from PIL import Image

from model.configs.spasemsr import ensure_demo_pipeline
from model.pipeline.prompt import GroundedPrompt, GroundingResult
from model.upscalers.base import UpscaleOptions, Upscaler
from model.upscalers.spasemsr import SpaSemSRUpscaler

PROMPT = GroundedPrompt(
    tags=("cat",), boxes=((0.1, 0.1, 0.6, 0.9),), caption="A blurry photo of a cat."
)


class RecordingGrounder:
    """A minimal implementation of the ``Grounder`` protocol that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, ...], str | None]] = []

    def ground(
        self,
        image: Image.Image,
        *,
        tags_hint: tuple[str, ...] = (),
        caption_hint: str | None = None,
    ) -> GroundingResult:
        self.calls.append((tags_hint, caption_hint))
        return GroundingResult(prompt=PROMPT, timings={"tagger": 0.01, "detector": 0.02})


@pytest.fixture(scope="module")
def upscaler(tiny_pipeline_folder: Path) -> SpaSemSRUpscaler:
    return SpaSemSRUpscaler.from_pretrained(tiny_pipeline_folder)


def test_card_says_spasemsr_tiny_untrained(
    upscaler: SpaSemSRUpscaler, tiny_pipeline_folder: Path
) -> None:
    assert isinstance(upscaler, Upscaler)
    card = upscaler.card
    assert (card.name, card.configuration, card.trained) == ("spasemsr", "tiny", False)
    # The folder's name only: the card is shown to every client, a server path is not theirs.
    assert card.weights == tiny_pipeline_folder.name
    assert str(tiny_pipeline_folder.parent) not in card.weights
    assert "random" in card.source
    assert (card.device, card.dtype) == ("cpu", "float32")
    assert "untrained" in card.description.lower()


def test_upscale_gives_exactly_scale_times_the_input_with_timings(
    upscaler: SpaSemSRUpscaler,
) -> None:
    upscaler.warm_up()
    for size, scale in (((32, 32), 4), ((21, 13), 2)):
        result = upscaler.upscale(
            Image.new("RGB", size, (90, 140, 30)), UpscaleOptions(scale=scale, steps=2, seed=0)
        )
        assert result.image.size == (size[0] * scale, size[1] * scale)
        assert set(result.timings) >= {"grounding", "encode", "denoise", "decode", "total"}
        assert all(value >= 0 for value in result.timings.values())
        assert result.timings["total"] >= result.timings["denoise"]
        json.dumps(result.details)


def test_non_rgb_input_is_converted(upscaler: SpaSemSRUpscaler) -> None:
    result = upscaler.upscale(
        Image.new("L", (10, 10), 128), UpscaleOptions(scale=2, steps=1, seed=0)
    )
    assert result.image.mode == "RGB" and result.image.size == (20, 20)


def test_default_prompt_honours_the_hints(upscaler: SpaSemSRUpscaler) -> None:
    options = UpscaleOptions(
        scale=2, steps=1, seed=0, tags_hint=("dog", "grass"), caption_hint="A grainy dog."
    )
    grounding = upscaler.upscale(Image.new("RGB", (16, 16)), options).details["grounding"]
    assert grounding["source"] == "default"
    assert grounding["tags"] == ["dog", "grass"] and grounding["caption"] == "A grainy dog."
    assert grounding["boxes"] == [[0.0, 0.0, 1.0, 1.0]] * 2


def test_request_prompt_wins_over_the_grounder(tiny_pipeline_folder: Path) -> None:
    grounder = RecordingGrounder()
    upscaler = SpaSemSRUpscaler.from_pretrained(tiny_pipeline_folder, grounder=grounder)
    request = GroundedPrompt(tags=("sky",), boxes=((0.0, 0.0, 1.0, 0.5),), caption="sky")
    result = upscaler.upscale(
        Image.new("RGB", (16, 16)), UpscaleOptions(scale=2, steps=1, seed=0, prompt=request)
    )
    assert result.details["grounding"]["source"] == "request"
    assert result.details["grounding"]["tags"] == ["sky"]
    assert grounder.calls == []

    result = upscaler.upscale(
        Image.new("RGB", (16, 16)),
        UpscaleOptions(scale=2, steps=1, seed=0, tags_hint=("cat",), caption_hint="hint"),
    )
    grounding = result.details["grounding"]
    assert grounding["source"] == "grounder" and grounding["tags"] == ["cat"]
    assert grounding["timings"] == {"tagger": 0.01, "detector": 0.02}
    assert grounder.calls == [(("cat",), "hint")]


def test_same_seed_same_image(upscaler: SpaSemSRUpscaler) -> None:
    image = Image.effect_noise((24, 24), 40).convert("RGB")
    options = UpscaleOptions(scale=4, steps=2, seed=11)
    first = upscaler.upscale(image, options)
    second = upscaler.upscale(image, options)
    assert first.image.tobytes() == second.image.tobytes()
    assert first.details["seed"] == 11


def test_progress_stages_in_order(upscaler: SpaSemSRUpscaler) -> None:
    calls: list[tuple[str, int, int]] = []
    upscaler.upscale(
        Image.new("RGB", (16, 16)),
        UpscaleOptions(scale=2, steps=3, seed=0),
        on_progress=lambda *c: calls.append(c),
    )
    stages = [stage for stage, _, _ in calls]
    assert stages[0] == "grounding" and stages[-1] == "decode"
    assert [c for c in calls if c[0] == "denoise"] == [
        ("denoise", 1, 3),
        ("denoise", 2, 3),
        ("denoise", 3, 3),
    ]
    assert stages.index("encode") < stages.index("denoise") < stages.index("decode")


def test_cancellation_from_the_callback_propagates_unchanged(upscaler: SpaSemSRUpscaler) -> None:
    class JobCanceled(Exception):
        pass

    error = JobCanceled("canceled by user")

    def cancel(stage: str, step: int, total: int) -> None:
        if stage == "denoise" and step == 1:
            raise error

    with pytest.raises(JobCanceled) as caught:
        upscaler.upscale(
            Image.new("RGB", (16, 16)), UpscaleOptions(scale=2, steps=4, seed=0), on_progress=cancel
        )
    assert caught.value is error


def test_demo_folder_is_built_once_and_marked_untrained(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "spasemsr-tiny"
    assert ensure_demo_pipeline(folder) == folder
    index = json.loads((folder / "model_index.json").read_text())
    assert (index["configuration"], index["trained"]) == ("tiny", False)
    stamp = (folder / "unet" / "config.json").stat().st_mtime_ns
    assert ensure_demo_pipeline(folder) == folder
    assert (folder / "unet" / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in folder.parent.iterdir()] == ["spasemsr-tiny"]  # no staging folder left


def test_demo_folder_survives_a_race(tmp_path: Path) -> None:
    folder = tmp_path / "spasemsr-tiny"
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(ensure_demo_pipeline(folder))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and results == [folder] * 3
    assert [p.name for p in tmp_path.iterdir()] == ["spasemsr-tiny"]
    assert SpaSemSRUpscaler.from_pretrained(folder).card.configuration == "tiny"
