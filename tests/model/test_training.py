"""Training of SpaSemSR's blocks (DESIGN 1.4) on the tiny configuration, CPU, generated images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.configs import build_tiny_pipeline
from model.pipeline import SpaSemSRPipeline
from model.spasemsr import SpaSemSRUpscaler
from model.training import (
    PROMPT_CACHE,
    HRPatchDataset,
    SpaSemSRTrainer,
    TrainingConfig,
    build_prompt_cache,
    collate,
    find_hr_images,
    list_checkpoints,
    train,
)
from model.upscaler import UpscaleOptions

SIDE = 64


def tiny_config(**changes: object) -> TrainingConfig:
    settings: dict[str, object] = {
        "learning_rate": 1e-3,
        "warmup_steps": 0,
        "batch_size": 4,
        "resolution": SIDE,
        "max_steps": 3,
        "checkpoint_every": 2,
        "log_every": 1,
        **changes,
    }
    return TrainingConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight smooth random HR images (bicubic blow-ups of 4x4 noise), some in a sub-folder."""
    root = tmp_path_factory.mktemp("training-data")
    rng = np.random.default_rng(0)
    for index in range(8):
        folder = root / "hr" / ("nested" if index % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        image = Image.fromarray(small).resize((SIDE, SIDE), Image.Resampling.BICUBIC)
        image.save(folder / f"image-{index}.png")
    return root


def fixed_batch(data_dir: Path) -> dict[str, object]:
    files = find_hr_images(data_dir)
    root = data_dir / "hr"
    prompts, _ = build_prompt_cache(files, root, data_dir / "unused-cache.json", None)
    dataset = HRPatchDataset(files, root, prompts, resolution=SIDE, horizontal_flip=False)
    torch.manual_seed(0)
    return collate([dataset[index] for index in range(4)])


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def unchanged(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(value, before[name]) for name, value in module.state_dict().items())


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="null_prompt_ratio"):
        TrainingConfig(null_prompt_ratio=1.5)
    with pytest.raises(ValueError, match="multiple of the scale"):
        TrainingConfig(resolution=510)
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainingConfig(mixed_precision="fp8")  # type: ignore[arg-type]


def test_training_steps_lower_the_loss_and_leave_frozen_parts_alone(data_dir: Path) -> None:
    pipeline = build_tiny_pipeline(seed=0)
    frozen = {
        "unet": snapshot(pipeline.unet),
        "vae": snapshot(pipeline.vae),
        "text_encoder": snapshot(pipeline.text_encoder),
    }
    controlnet_before = snapshot(pipeline.controlnet)
    trainer = SpaSemSRTrainer(pipeline, tiny_config())
    target_before = snapshot(trainer.target_encoder)
    batch = fixed_batch(data_dir)

    def evaluate() -> float:
        with torch.no_grad():
            terms = trainer.losses(batch, generator=torch.Generator().manual_seed(123))
        return float(terms["total"])

    before = evaluate()
    for _ in range(16):
        means = trainer.training_step(batch)
        assert means is not None
        assert set(means) == {"total", "diffusion", "image", "semantic", "controlnet"}
        assert all(np.isfinite(value) for value in means.values())
    after = evaluate()
    assert after < 0.98 * before, (before, after)

    # only the trained blocks carry gradients and optimiser state
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipeline, name)
        assert not any(p.requires_grad for p in module.parameters())
        assert not optimised & {id(p) for p in module.parameters()}
        assert unchanged(module, frozen[name]), name
    assert unchanged(trainer.target_encoder, target_before)
    for name in ("image_encoder", "semantic_encoder", "controlnet", "unet_attention"):
        assert {id(p) for p in getattr(pipeline, name).parameters()} <= optimised, name
    assert not unchanged(pipeline.controlnet, controlnet_before)


def test_train_saves_a_loadable_pipeline_caches_prompts_and_resumes(
    data_dir: Path, tiny_pipeline_folder: Path, tmp_path: Path
) -> None:
    grounding = pytest.importorskip("model.grounding")
    grounder = grounding.build_tiny_grounder(seed=0)
    output = tmp_path / "run"

    first = train(
        tiny_config(),
        data_dir=data_dir,
        output_dir=output,
        pipeline_dir=tiny_pipeline_folder,
        grounder=grounder,
    )
    assert (first.first_step, first.global_step, len(first.losses)) == (0, 3, 3)
    assert first.grounded_images == 8
    cache = json.loads((output / PROMPT_CACHE).read_text())["images"]
    assert sorted(cache) == sorted(
        p.relative_to(data_dir / "hr").as_posix() for p in find_hr_images(data_dir)
    )
    assert all(entry["source"] == "grounder" and entry["caption"] for entry in cache.values())
    assert [p.name for p in list_checkpoints(output)] == ["checkpoint-2", "checkpoint-3"]

    # the checkpoint's pipeline folder loads back, marked trained, with the trained weights
    loaded = SpaSemSRPipeline.from_pretrained(str(first.pipeline_dir))
    assert loaded.config["trained"] is True
    base = SpaSemSRPipeline.from_pretrained(str(tiny_pipeline_folder))
    assert base.config["trained"] is False
    trained_fusion = loaded.controlnet.condition_fusion.proj.weight
    assert not torch.equal(trained_fusion, base.controlnet.condition_fusion.proj.weight)
    assert torch.equal(loaded.unet.conv_in.weight, base.unet.conv_in.weight)
    upscaler = SpaSemSRUpscaler.from_pretrained(first.pipeline_dir)
    assert upscaler.card.trained
    result = upscaler.upscale(
        Image.new("RGB", (16, 16), (90, 140, 200)), UpscaleOptions(scale=2, steps=2, seed=0)
    )
    assert result.image.size == (32, 32)

    # resume continues the step count from the latest checkpoint and reuses the prompt cache
    second = train(
        tiny_config(max_steps=5),
        data_dir=data_dir,
        output_dir=output,
        pipeline_dir=tiny_pipeline_folder,
        resume=True,
        grounder=grounder,
    )
    assert (second.first_step, second.global_step, len(second.losses)) == (3, 5, 2)
    assert second.grounded_images == 0
    assert [p.name for p in list_checkpoints(output)] == [
        "checkpoint-3",
        "checkpoint-4",
        "checkpoint-5",
    ]
    resumed = SpaSemSRPipeline.from_pretrained(str(second.pipeline_dir))
    assert not torch.equal(resumed.controlnet.condition_fusion.proj.weight, trained_fusion)
