"""``SpaSemSRPipeline`` end to end on the tiny configuration (CPU, seeded weights, no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from model.configs.spasemsr import build_tiny_pipeline
from model.pipeline.diffusion import SCHEDULERS, SpaSemSRPipeline
from model.pipeline.prompt import GroundedPrompt

PROMPT = GroundedPrompt(
    tags=("sky", "sand", "dog"),
    boxes=((0.0, 0.0, 1.0, 0.45), (0.0, 0.45, 1.0, 1.0), (0.55, 0.5, 0.9, 0.95)),
    caption="A noisy, low-resolution image of a beach with a dog.",
)


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    phase = rng.uniform(0, 6, size=3)
    channels = [0.5 + 0.4 * np.sin(5 * xx + 3 * yy + p) for p in phase]
    return Image.fromarray((np.stack(channels, -1) * 255).astype(np.uint8))


def run(
    pipe: SpaSemSRPipeline, image: Image.Image, *, seed: int = 0, **kwargs: Any
) -> torch.Tensor:
    options: dict[str, Any] = {"scale": 4, "prompt": PROMPT, "num_inference_steps": 2}
    options.update(kwargs)
    output = pipe(image, generator=torch.Generator().manual_seed(seed), output_type="pt", **options)
    images = output.images
    assert isinstance(images, torch.Tensor)
    return images


@pytest.mark.parametrize(
    ("size", "scale"), [((32, 32), 4), ((32, 32), 2), ((17, 9), 4), ((33, 20), 2), ((1, 1), 2)]
)
def test_output_is_exactly_scale_times_the_input(
    tiny_pipeline: SpaSemSRPipeline, size: tuple[int, int], scale: int
) -> None:
    output = tiny_pipeline(
        smooth_image(*size),
        scale=scale,
        prompt=PROMPT,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    (image,) = output.images
    assert isinstance(image, Image.Image)
    assert image.size == (size[0] * scale, size[1] * scale)
    assert image.mode == "RGB"
    assert set(output.timings) >= {"encode", "denoise", "decode", "text", "vae_encode", "guidance"}
    assert output.prompt == PROMPT


def test_same_seed_same_image_other_seed_other_image(tiny_pipeline: SpaSemSRPipeline) -> None:
    image = smooth_image(24, 20)
    first = run(tiny_pipeline, image, seed=7)
    assert torch.equal(first, run(tiny_pipeline, image, seed=7))
    assert not torch.equal(first, run(tiny_pipeline, image, seed=8))


def test_same_seed_same_weights() -> None:
    a, b = build_tiny_pipeline(seed=3), build_tiny_pipeline(seed=3)
    for (name, x), (_, y) in zip(
        a.controlnet.state_dict().items(), b.controlnet.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), name
    image = smooth_image(16, 16)
    assert torch.equal(run(a, image), run(b, image))


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_scheduler_runs(tiny_pipeline: SpaSemSRPipeline, scheduler: str) -> None:
    result = run(tiny_pipeline, smooth_image(16, 12), scheduler=scheduler, num_inference_steps=3)
    assert result.shape == (1, 3, 48, 64)
    assert torch.isfinite(result).all() and result.min() >= 0 and result.max() <= 1


def test_guidance_scale_and_negative_prompt_take_effect(tiny_pipeline: SpaSemSRPipeline) -> None:
    image = smooth_image(16, 16)
    no_cfg = run(tiny_pipeline, image, guidance_scale=1.0, color_fix="none")
    cfg = run(tiny_pipeline, image, guidance_scale=4.5, color_fix="none")
    other_negative = run(
        tiny_pipeline, image, guidance_scale=4.5, negative_prompt="cartoon", color_fix="none"
    )
    assert not torch.equal(no_cfg, cfg)
    assert not torch.equal(cfg, other_negative)


def test_default_prompt_when_none_is_given(tiny_pipeline: SpaSemSRPipeline) -> None:
    output = tiny_pipeline(smooth_image(16, 16), scale=2, num_inference_steps=1)
    assert output.prompt.tags == () and "low-resolution" in output.prompt.caption


def test_colour_fix_pulls_towards_the_upsampled_input(tiny_pipeline: SpaSemSRPipeline) -> None:
    image = smooth_image(16, 16)
    upsampled = (
        torch.from_numpy(np.array(image.resize((64, 64), Image.Resampling.BICUBIC))).permute(
            2, 0, 1
        )
        / 255
    )
    errors = {
        mode: (run(tiny_pipeline, image, color_fix=mode)[0].mean((1, 2)) - upsampled.mean((1, 2)))
        .abs()
        .max()
        .item()
        for mode in ("none", "adain", "wavelet")
    }
    assert errors["adain"] < errors["none"] and errors["wavelet"] < errors["none"]


def test_callback_reports_stages_and_every_step(tiny_pipeline: SpaSemSRPipeline) -> None:
    calls: list[tuple[str, int, int]] = []
    run(
        tiny_pipeline,
        smooth_image(16, 16),
        num_inference_steps=3,
        callback=lambda *call: calls.append(call),
    )
    assert calls == [
        ("encode", 0, 1),
        ("encode", 1, 1),
        ("denoise", 1, 3),
        ("denoise", 2, 3),
        ("denoise", 3, 3),
        ("decode", 0, 1),
        ("decode", 1, 1),
    ]


def test_an_exception_from_the_callback_stops_the_run_unchanged(
    tiny_pipeline: SpaSemSRPipeline,
) -> None:
    class Cancelled(Exception):
        pass

    raised = Cancelled("job canceled")
    steps: list[int] = []

    def cancel_at_step_two(stage: str, step: int, total: int) -> None:
        if stage == "denoise":
            steps.append(step)
            if step == 2:
                raise raised

    with pytest.raises(Cancelled) as caught:
        run(tiny_pipeline, smooth_image(16, 16), num_inference_steps=5, callback=cancel_at_step_two)
    assert caught.value is raised
    assert steps == [1, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale": 3}, "scale"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"scheduler": "euler"}, "scheduler"),
        ({"color_fix": "histogram"}, "colour fix"),
        ({"tile_size": 8}, "tile_size"),
        ({"tile_size": 64, "tile_overlap": 64}, "tile_overlap"),
    ],
)
def test_check_inputs_rejects_bad_arguments(
    tiny_pipeline: SpaSemSRPipeline, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_pipeline(smooth_image(8, 8), **kwargs)  # type: ignore[arg-type]


def test_check_inputs_rejects_bad_images(tiny_pipeline: SpaSemSRPipeline) -> None:
    with pytest.raises(ValueError, match="tensor"):
        tiny_pipeline(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="PIL"):
        tiny_pipeline(np.zeros((8, 8, 3)))  # type: ignore[arg-type]


def test_tensor_input_equals_pil_input(tiny_pipeline: SpaSemSRPipeline) -> None:
    image = smooth_image(12, 10)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    pil_output = run(tiny_pipeline, image)
    tensor_output = tiny_pipeline(
        tensor,
        scale=4,
        prompt=PROMPT,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert isinstance(tensor_output, torch.Tensor)
    assert torch.equal(pil_output, tensor_output)


# --- tiling -------------------------------------------------------------------------------------


def test_tiled_run_over_an_image_that_fits_one_tile_equals_the_untiled_run(
    tiny_pipeline: SpaSemSRPipeline,
) -> None:
    image = smooth_image(30, 22)  # 120 x 88 output
    assert torch.equal(
        run(tiny_pipeline, image, tile_size=128), run(tiny_pipeline, image, tile_size=None)
    )


def test_large_tiled_output_has_no_seams(tiny_pipeline: SpaSemSRPipeline) -> None:
    """Gradient energy across tile borders is within 10% of that across other cell borders."""
    image = smooth_image(48, 48)
    tile_size = 64  # output pixels: 8 x 8 latent tiles over a 24 x 24 latent
    output = run(tiny_pipeline, image, tile_size=tile_size, color_fix="none")
    assert output.shape == (1, 3, 192, 192)
    tiles = tiny_pipeline._tiles(24, 24, tile_size, None)
    assert len(tiles) > 4
    cell = tiny_pipeline.vae_scale_factor
    luma = output[0].mean(0)
    for axis, starts in ((1, sorted({t.left for t in tiles})), (0, sorted({t.top for t in tiles}))):
        energy = (
            luma.diff(dim=axis).abs().mean(dim=1 - axis)
        )  # energy[i]: between pixel i and i + 1
        edges = {s * cell for s in starts if s > 0} | {(s + tiles[0].width) * cell for s in starts}
        edges.discard(luma.shape[axis])
        borders = sorted(edge - 1 for edge in edges)
        others = [i for i in range(cell - 1, luma.shape[axis] - 1, cell) if i not in borders]
        assert borders and others
        ratio = energy[borders].mean() / energy[others].mean()
        assert ratio < 1.1, (axis, ratio.item())


def test_tiles_see_only_the_boxes_that_intersect_them(tiny_pipeline: SpaSemSRPipeline) -> None:
    """Per-tile spatial text: a tile away from the dog's box gets the prompt without "dog"; each
    distinct tag prompt goes through the text encoder once per image, before the loop."""
    conditioner = tiny_pipeline.text_conditioner
    encoded: list[tuple[str, ...]] = []
    original = conditioner.encode_tags

    def recording(tags):  # type: ignore[no-untyped-def]
        encoded.append(tuple(tags))
        return original(tags)

    conditioner.encode_tags = recording  # type: ignore[method-assign]
    try:
        run(tiny_pipeline, smooth_image(48, 48), tile_size=64, num_inference_steps=2)
    finally:
        del conditioner.encode_tags
    assert ("sky", "sand", "dog") in encoded and ("sky",) in encoded
    assert len(encoded) == len(set(encoded))


# --- save / load ---------------------------------------------------------------------------------


def test_save_and_load_give_identical_outputs(
    tiny_pipeline: SpaSemSRPipeline, tmp_path: Path
) -> None:
    tiny_pipeline.save_pretrained(tmp_path / "pipe")
    loaded = SpaSemSRPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.config["configuration"] == "tiny" and loaded.config["trained"] is False
    for part in (
        "unet",
        "controlnet",
        "unet_attention",
        "image_encoder",
        "semantic_encoder",
        "vae",
        "text_encoder",
    ):
        assert (tmp_path / "pipe" / part).is_dir()
    image = smooth_image(20, 14)
    assert torch.equal(run(tiny_pipeline, image), run(loaded, image))
