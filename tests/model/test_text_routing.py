"""Which text each network reads (Figure 2): ``T_deg`` conditions the ControlNet only, and the
frozen UNet's own cross-attention reads the semantic (tag) prompt, unless the pipeline's
``unet_prompt`` says ``caption``; training routes the same way as serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from model.blocks.text import DEFAULT_NEGATIVE_PROMPT
from model.configs.spasemsr import build_tiny_pipeline
from model.pipeline.diffusion import SpaSemSRPipeline
from model.pipeline.prompt import GroundedPrompt
from model.training.trainer import SpaSemSRTrainer
from tests.model.test_training import data_dir as data_dir  # the fixture: eight HR images
from tests.model.test_training import fixed_batch, tiny_config

PROMPT = GroundedPrompt(
    tags=("sky", "sand"),
    boxes=((0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)),
    caption="A noisy, low-resolution image of a beach.",
)


@contextmanager
def recorded_texts(pipeline: SpaSemSRPipeline) -> Iterator[dict[str, list[torch.Tensor]]]:
    """The UNet's ``encoder_hidden_states`` and the ControlNet's ``degradation_text`` of every
    forward while the block runs."""
    seen: dict[str, list[torch.Tensor]] = {"unet": [], "controlnet": []}

    def on_unet(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["unet"].append(kwargs["encoder_hidden_states"].detach().clone())

    def on_controlnet(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["controlnet"].append(kwargs["degradation_text"].detach().clone())

    hooks = [
        pipeline.unet.register_forward_pre_hook(on_unet, with_kwargs=True),
        pipeline.controlnet.register_forward_pre_hook(on_controlnet, with_kwargs=True),
    ]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def run(pipeline: SpaSemSRPipeline) -> None:
    pipeline(
        Image.new("RGB", (24, 24), (120, 160, 200)),
        scale=2,
        prompt=PROMPT,
        num_inference_steps=1,
        guidance_scale=4.5,
        color_fix="none",
        generator=torch.Generator().manual_seed(0),
    )


def conditional_half(texts: list[torch.Tensor]) -> torch.Tensor:
    """The conditional half of the (only) forward: CFG batches ``[uncond, cond]``."""
    assert len(texts) == 1 and texts[0].shape[0] == 2, [t.shape for t in texts]
    return texts[0][1:]


def test_the_unet_reads_the_tag_prompt_and_the_controlnet_the_degradation_caption() -> None:
    pipeline = build_tiny_pipeline(seed=0)
    assert pipeline.config["unet_prompt"] == "tags"
    conditioner = pipeline.text_conditioner
    caption = conditioner.encode(PROMPT.caption)
    _, tags = conditioner.encode_spatial_and_tags(PROMPT.tags, PROMPT.boxes)
    assert not torch.allclose(caption, tags)
    with recorded_texts(pipeline) as seen:
        run(pipeline)
    torch.testing.assert_close(conditional_half(seen["unet"]), tags)
    torch.testing.assert_close(conditional_half(seen["controlnet"]), caption)
    negative = conditioner.encode(DEFAULT_NEGATIVE_PROMPT)
    torch.testing.assert_close(seen["unet"][0][:1], negative)


def test_the_caption_choice_gives_the_unet_the_degradation_caption() -> None:
    pipeline = build_tiny_pipeline(seed=0)
    pipeline.register_to_config(unet_prompt="caption")  # type: ignore[no-untyped-call]
    caption = pipeline.text_conditioner.encode(PROMPT.caption)
    with recorded_texts(pipeline) as seen:
        run(pipeline)
    torch.testing.assert_close(conditional_half(seen["unet"]), caption)
    torch.testing.assert_close(conditional_half(seen["controlnet"]), caption)


def test_an_unknown_choice_is_refused() -> None:
    pipeline = build_tiny_pipeline(seed=0)
    with pytest.raises(ValueError, match="unet_prompt"):
        SpaSemSRPipeline(**pipeline.components, unet_prompt="everything")


@pytest.mark.parametrize("choice", ["tags", "caption"])
def test_training_gives_the_unet_the_text_serving_gives_it(
    data_dir: Path, tmp_path: Path, choice: str
) -> None:
    pipeline = build_tiny_pipeline(seed=0)
    pipeline.register_to_config(unet_prompt=choice)  # type: ignore[no-untyped-call]
    trainer = SpaSemSRTrainer(pipeline, tiny_config(null_prompt_ratio=0.0))
    batch = fixed_batch(data_dir)
    batch["tags"] = [PROMPT.tags] * 4
    batch["boxes"] = [PROMPT.boxes] * 4
    with recorded_texts(pipeline) as seen, torch.no_grad():
        trainer.losses(batch, generator=torch.Generator().manual_seed(0))
    (unet_text,), (controlnet_text,) = seen["unet"], seen["controlnet"]
    conditioner = pipeline.text_conditioner
    _, tags = conditioner.encode_spatial_and_tags(PROMPT.tags, PROMPT.boxes)
    # each sample's own caption (from its own LR) in the caption choice
    expected = tags.expand(4, -1, -1) if choice == "tags" else controlnet_text
    torch.testing.assert_close(unet_text, expected)
    assert not torch.allclose(controlnet_text[:1], tags)  # the ControlNet keeps T_deg
    saved = trainer.save_pipeline(tmp_path / "trained")
    assert json.loads((saved / "model_index.json").read_text())["unet_prompt"] == choice
