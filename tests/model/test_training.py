"""Training of SpaSemSR's blocks (DESIGN 1.4) on the tiny configuration, CPU, generated images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SamVisionModel

from model.configs.spasemsr import build_tiny_pipeline
from model.grounding.degradation import (
    CaptionThresholds,
    DegradationEstimates,
    compose_caption,
    estimate_degradations,
)
from model.pipeline.diffusion import SpaSemSRPipeline
from model.pipeline.prompt import GroundedPrompt
from model.training.config import TrainingConfig
from model.training.degradations import (
    DegradationOrderConfig,
    RealESRGANDegradation,
    RealESRGANDegradationConfig,
)
from model.training.trainer import (
    PROMPT_CACHE,
    SAM_TARGET,
    SEMDEG_HEADS,
    HRPatchDataset,
    SemanticDegradationHeads,
    SpaSemSRTrainer,
    TrainingReport,
    build_prompt_cache,
    caption_scene,
    collate,
    degradation_captions,
    find_hr_images,
    list_checkpoints,
    load_sam_target,
    measure_degradations,
    train,
)
from model.upscalers.base import UpscaleOptions
from model.upscalers.spasemsr import SpaSemSRUpscaler

SIDE = 64
SEMDEG_TERMS = {"image", "semantic", "controlnet_image", "controlnet_semantic"}
CLEAN_HR_CAPTION = (
    "A clean, low-resolution image of sky and sand. "
    "The image shows no strong noise, blur or compression artifacts."
)
_NOISY_ORDER = DegradationOrderConfig(
    noise_range=(25.0, 30.0),
    gaussian_noise_prob=1.0,
    resize_prob=(0.0, 0.0, 1.0),
    jpeg_range=(90.0, 95.0),
)
HEAVY_NOISE = RealESRGANDegradationConfig(
    scale=2, first=_NOISY_ORDER, second=_NOISY_ORDER, second_blur_prob=0.0, final_sinc_prob=0.0
)
"""Real-ESRGAN's pipeline with strong Gaussian noise in both orders and nothing that smooths it
away afterwards (no second blur, no final sinc, mild JPEG)."""


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


def grounded_batch(data_dir: Path, caption: str) -> dict[str, object]:
    """Four patches whose cached HR prompt has ``caption``, as a grounder writes it."""
    files = find_hr_images(data_dir)
    root = data_dir / "hr"
    prompts = {path.relative_to(root).as_posix(): GroundedPrompt(caption=caption) for path in files}
    dataset = HRPatchDataset(files, root, prompts, resolution=SIDE, horizontal_flip=False)
    torch.manual_seed(0)
    return collate([dataset[index] for index in range(4)])


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    first, second = a.state_dict(), b.state_dict()
    return first.keys() == second.keys() and all(
        torch.equal(value, second[name]) for name, value in first.items()
    )


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
    with pytest.raises(ValueError, match="lambda_semdeg"):
        TrainingConfig(lambda_semdeg=-0.1)


def test_training_steps_lower_the_loss_and_leave_frozen_parts_alone(data_dir: Path) -> None:
    pipeline = build_tiny_pipeline(seed=0)
    frozen = {
        "unet": snapshot(pipeline.unet),
        "vae": snapshot(pipeline.vae),
        "text_encoder": snapshot(pipeline.text_encoder),
    }
    controlnet_before = snapshot(pipeline.controlnet)
    trainer = SpaSemSRTrainer(pipeline, tiny_config())
    target_before = snapshot(trainer.sam_target)
    batch = fixed_batch(data_dir)

    def evaluate() -> float:
        with torch.no_grad():
            terms = trainer.losses(batch, generator=torch.Generator().manual_seed(123))
        return float(terms["total"])

    before = evaluate()
    for _ in range(16):
        means = trainer.training_step(batch)
        assert means is not None
        assert set(means) == {"total", "diffusion", "semdeg", *SEMDEG_TERMS}
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
    assert not any(p.requires_grad for p in trainer.sam_target.parameters())
    assert not optimised & {id(p) for p in trainer.sam_target.parameters()}
    assert unchanged(trainer.sam_target, target_before)
    for name in ("image_encoder", "semantic_encoder", "controlnet", "unet_attention"):
        assert {id(p) for p in getattr(pipeline, name).parameters()} <= optimised, name
    heads = trainer.trainable.semdeg_heads
    assert heads is not None and {id(p) for p in heads.parameters()} <= optimised
    assert not unchanged(pipeline.controlnet, controlnet_before)


# --- item: the caption of each LR --------------------------------------------------------------


def test_the_training_caption_names_the_degradations_of_its_own_lr(data_dir: Path) -> None:
    """The cached HR prompt says "clean"; the text encoder must instead see, for each heavily
    noised LR, a caption that names the noise, around the HR caption's scene words."""
    batch = grounded_batch(data_dir, CLEAN_HR_CAPTION)
    trainer = SpaSemSRTrainer(build_tiny_pipeline(seed=0), tiny_config(null_prompt_ratio=0.0))
    trainer.degradation = RealESRGANDegradation(HEAVY_NOISE)
    tokenizer = trainer.text.tokenizer
    encoded: list[str] = []
    original = trainer.text._encode_ids

    def recording(input_ids: torch.Tensor) -> torch.Tensor:
        encoded.extend(tokenizer.batch_decode(input_ids, skip_special_tokens=True))
        return original(input_ids)

    trainer.text._encode_ids = recording  # type: ignore[method-assign]
    with torch.no_grad():
        trainer.losses(batch, generator=torch.Generator().manual_seed(0))
    captions = [text for text in encoded if "image" in text]
    assert len(captions) == 4, encoded
    for caption in captions:
        assert "noisy" in caption and "noise" in caption.split("exhibits")[-1], caption
        assert "clean" not in caption and "no strong" not in caption, caption
        assert "sky and sand" in caption, caption


def test_batched_estimates_are_the_grounders_per_image_estimates() -> None:
    """The training captions measure each LR exactly as the grounder measures an upload."""
    rng = np.random.default_rng(1)
    images = [
        Image.fromarray(rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)).resize(
            (96, 96), Image.Resampling.BICUBIC
        )
        for _ in range(4)
    ]
    hr = torch.stack(
        [torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0) for image in images]
    ).permute(0, 3, 1, 2)
    for config in (RealESRGANDegradationConfig(scale=2), HEAVY_NOISE):
        lr = RealESRGANDegradation(config)(hr, torch.Generator().manual_seed(2))
        batched = measure_degradations(lr)
        for index, measured in enumerate(batched):
            array = (lr[index].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
            expected = estimate_degradations(Image.fromarray(array)).as_dict()
            for name, value in measured.as_dict().items():
                assert value == pytest.approx(expected[name], rel=1e-9, abs=1e-9), name
        scenes = ["sky"] * 4
        assert degradation_captions(lr, scenes) == [
            compose_caption(measured, "sky") for measured in batched
        ]


def test_the_scene_words_of_a_grounder_caption_carry_over() -> None:
    estimates = [
        DegradationEstimates(
            noise_sigma=noise,
            blur=blur,
            laplacian_variance=1.0,
            blockiness=blocks,
            width=side,
            height=side,
        )
        for noise, blur, blocks, side in ((0.5, 0.1, 0.0, 1024), (9.0, 0.9, 0.7, 128))
    ]
    for scene in ("sky, water and sand", "a dog on a beach", "seaside landscape"):
        for measured in estimates:
            caption = compose_caption(measured, scene, CaptionThresholds())
            assert caption_scene(caption, ()) == scene, caption
    # a caption of another form: the tags' scene words
    assert caption_scene("A low-resolution image. It is blurry.", ("sky", "sea")) == "sky and sea"
    assert caption_scene("", ()) == ""


# --- item: the semantic degradation constraint -------------------------------------------------


def test_the_constraint_is_not_met_by_a_controlnet_that_ignores_its_guidance(
    data_dir: Path,
) -> None:
    """A fresh ControlNet's guidance fusion is zero: it ignores ``f``. The ControlNet terms of
    L_SemDeg must still be far from zero and pull the fusion towards using ``f``."""
    pipeline = build_tiny_pipeline(seed=0)
    fusion = pipeline.controlnet.condition_fusion.proj
    assert torch.count_nonzero(fusion.weight) == 0
    trainer = SpaSemSRTrainer(pipeline, tiny_config())
    terms = trainer.losses(fixed_batch(data_dir), generator=torch.Generator().manual_seed(0))
    controlnet_terms = {n: float(v.detach()) for n, v in terms.items() if "controlnet" in n}
    assert controlnet_terms and all(value > 0.01 for value in controlnet_terms.values()), terms
    (terms["total"] - terms["diffusion"]).backward()  # type: ignore[no-untyped-call]
    assert fusion.weight.grad is not None and float(fusion.weight.grad.abs().sum()) > 0


def test_one_lambda_weighs_the_sum_of_the_constraint_terms(data_dir: Path) -> None:
    batch = fixed_batch(data_dir)
    trainer = SpaSemSRTrainer(build_tiny_pipeline(seed=0), tiny_config(lambda_semdeg=0.2))
    with torch.no_grad():
        terms = trainer.losses(batch, generator=torch.Generator().manual_seed(5))
    assert float(terms["semdeg"]) == pytest.approx(sum(float(terms[n]) for n in SEMDEG_TERMS))
    assert float(terms["total"]) == pytest.approx(
        float(terms["diffusion"]) + 0.2 * float(terms["semdeg"]), rel=1e-6
    )
    off = SpaSemSRTrainer(build_tiny_pipeline(seed=0), tiny_config(lambda_semdeg=0.0))
    assert off.trainable.semdeg_heads is None
    with torch.no_grad():
        assert set(off.losses(batch)) == {"total", "diffusion"}


def test_the_hr_prompts_of_training_carry_no_masks(data_dir: Path, tmp_path: Path) -> None:
    """No SpaSemSR block reads SAM masks, so grounding the HR images never computes them."""
    grounding = pytest.importorskip("model.configs.grounding")
    grounder = grounding.build_tiny_grounder(seed=0, masks=True)
    files = find_hr_images(data_dir)[:2]
    _, grounded = build_prompt_cache(files, data_dir / "hr", tmp_path / "cache.json", grounder)
    assert grounded == 2
    entries = json.loads((tmp_path / "cache.json").read_text())["images"].values()
    assert all(entry["masks"] == [] for entry in entries)


# --- runs: save, load, resume, fine-tune --------------------------------------------------------


@pytest.fixture(scope="module")
def first_run(
    data_dir: Path, tiny_pipeline_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> TrainingReport:
    grounding = pytest.importorskip("model.configs.grounding")
    return train(
        tiny_config(),
        data_dir=data_dir,
        output_dir=tmp_path_factory.mktemp("training") / "run",
        pipeline_dir=tiny_pipeline_folder,
        grounder=grounding.build_tiny_grounder(seed=0),
    )


def test_train_saves_a_loadable_pipeline_caches_prompts_and_resumes(
    first_run: TrainingReport, data_dir: Path, tiny_pipeline_folder: Path
) -> None:
    grounding = pytest.importorskip("model.configs.grounding")
    grounder = grounding.build_tiny_grounder(seed=0)
    first, output = first_run, first_run.output_dir
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
    # beside the blocks: the frozen SAM target (SAM itself, not the trained encoder) and heads
    target = SamVisionModel.from_pretrained(first.pipeline_dir / SAM_TARGET)
    assert same_weights(target, base.semantic_encoder)
    assert not same_weights(loaded.semantic_encoder, base.semantic_encoder)
    assert SemanticDegradationHeads.from_pretrained(first.pipeline_dir / SEMDEG_HEADS)
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


def test_fine_tuning_a_trained_folder_aims_at_the_frozen_sam(
    first_run: TrainingReport, data_dir: Path, tiny_pipeline_folder: Path, tmp_path: Path
) -> None:
    """The SAM target of a fine-tuning run is the frozen SAM, never the trained semantic
    encoder; an old trained folder without ``sam_target/`` is refused unless SAM is named."""
    trained = tmp_path / "trained"
    shutil.copytree(first_run.pipeline_dir, trained)
    sam = SpaSemSRPipeline.from_pretrained(str(tiny_pipeline_folder)).semantic_encoder
    pipeline = SpaSemSRPipeline.from_pretrained(str(trained))
    assert pipeline.config["trained"] is True
    assert not same_weights(pipeline.semantic_encoder, sam)
    with pytest.raises(ValueError, match=SAM_TARGET):
        SpaSemSRTrainer(pipeline, tiny_config())
    assert same_weights(load_sam_target(pipeline, trained), sam)

    tuned = train(
        tiny_config(max_steps=1),
        data_dir=data_dir,
        output_dir=tmp_path / "tuned",
        pipeline_dir=trained,
    )
    assert same_weights(SamVisionModel.from_pretrained(tuned.pipeline_dir / SAM_TARGET), sam)

    shutil.rmtree(trained / SAM_TARGET)
    with pytest.raises(ValueError, match=SAM_TARGET):
        train(
            tiny_config(max_steps=1),
            data_dir=data_dir,
            output_dir=tmp_path / "old",
            pipeline_dir=trained,
        )
    sam.save_pretrained(tmp_path / "sam")
    named = train(
        tiny_config(max_steps=1),
        data_dir=data_dir,
        output_dir=tmp_path / "named",
        pipeline_dir=trained,
        sam_dir=tmp_path / "sam",
    )
    assert same_weights(SamVisionModel.from_pretrained(named.pipeline_dir / SAM_TARGET), sam)
