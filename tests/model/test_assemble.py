"""Assembling a pipeline folder from component folders in their libraries' layouts (tiny)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import SamConfig, SamModel

from model.configs.assemble import assemble_pipeline
from model.configs.spasemsr import TINY
from model.pipeline.diffusion import SpaSemSRPipeline
from model.upscalers.base import UpscaleOptions
from model.upscalers.spasemsr import SpaSemSRUpscaler


@pytest.fixture(scope="module")
def component_folders(
    tiny_pipeline: SpaSemSRPipeline, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """An SD-style diffusers folder (vae, text_encoder, tokenizer, unet, scheduler) and a full SAM
    folder."""
    root = tmp_path_factory.mktemp("components")
    base = root / "stable-diffusion"
    for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler"):
        getattr(tiny_pipeline, name).save_pretrained(base / name)
    sam_config = SamConfig(
        vision_config=dict(TINY.semantic_encoder),
        prompt_encoder_config={
            "hidden_size": 16,
            "image_size": 64,
            "patch_size": 8,
            "mask_input_channels": 4,
        },
        mask_decoder_config={
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "mlp_dim": 32,
            "iou_head_hidden_dim": 16,
        },
    )
    torch.manual_seed(0)
    sam = SamModel(sam_config)
    sam.save_pretrained(root / "sam")
    return base, root / "sam"


def test_fresh_blocks_are_marked_untrained_and_start_from_the_components(
    component_folders: tuple[Path, Path], tiny_pipeline: SpaSemSRPipeline, tmp_path: Path
) -> None:
    base, sam = component_folders
    folder = assemble_pipeline(tmp_path / "fresh", base=base, sam=sam, configuration="tiny")
    index = json.loads((folder / "model_index.json").read_text())
    assert (index["trained"], index["configuration"]) == (False, "tiny")
    pipe = SpaSemSRPipeline.from_pretrained(folder)
    for name, tensor in tiny_pipeline.unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[name], tensor), name
    assert torch.equal(
        pipe.controlnet.down_blocks.state_dict()["0.resnets.0.conv1.weight"],
        tiny_pipeline.unet.down_blocks.state_dict()["0.resnets.0.conv1.weight"],
    )
    sam_weights = SamModel.from_pretrained(sam).vision_encoder.patch_embed.projection.weight
    assert torch.equal(
        pipe.semantic_encoder.vision_encoder.patch_embed.projection.weight, sam_weights
    )
    upscaler = SpaSemSRUpscaler.from_pretrained(folder)
    assert upscaler.card.trained is False
    assert upscaler.upscale(
        Image.new("RGB", (12, 8)), UpscaleOptions(scale=4, steps=1, seed=0)
    ).image.size == (48, 32)


def test_trained_blocks_are_taken_from_the_blocks_folder(
    component_folders: tuple[Path, Path], tiny_pipeline: SpaSemSRPipeline, tmp_path: Path
) -> None:
    base, _ = component_folders
    blocks = tmp_path / "training-output"
    changed = {}
    for name in ("controlnet", "unet_attention", "image_encoder", "semantic_encoder"):
        module = getattr(tiny_pipeline, name)
        state = {
            k: v + 0.01 if v.is_floating_point() else v for k, v in module.state_dict().items()
        }
        changed[name] = state
        copy = (
            type(module)(module.config)
            if name == "semantic_encoder"
            else type(module).from_config(module.config)
        )
        copy.load_state_dict(state)
        copy.save_pretrained(blocks / name)
    folder = assemble_pipeline(tmp_path / "trained", base=base, blocks=blocks, configuration="tiny")
    pipe = SpaSemSRPipeline.from_pretrained(folder)
    assert pipe.config["trained"] is True
    for name, state in changed.items():
        loaded = getattr(pipe, name).state_dict()
        for key, tensor in state.items():
            assert torch.equal(loaded[key], tensor), (name, key)
    assert SpaSemSRUpscaler.from_pretrained(folder).card.trained is True


def test_assemble_refuses_to_overwrite_and_checks_its_sources(
    component_folders: tuple[Path, Path], tmp_path: Path
) -> None:
    base, sam = component_folders
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        assemble_pipeline(tmp_path / "taken", base=base, sam=sam)
    with pytest.raises(ValueError, match="SAM"):
        assemble_pipeline(tmp_path / "out", base=base)
    (tmp_path / "blocks" / "controlnet").mkdir(parents=True)
    with pytest.raises(ValueError, match="lacks"):
        assemble_pipeline(tmp_path / "out", base=base, sam=sam, blocks=tmp_path / "blocks")
    assert not (tmp_path / "out").exists()
