"""Speed settings keep the pipeline's results: each setting that runs on CPU against the fp32 eager
run of the same tiny pipeline, same seed (:mod:`model.pipeline.performance`).

Tolerances: settings that only reorder or batch fp32 work (fused vs reference attention, NHWC
layout, CFG halves or tiles in one batch, compilation) differ by float rounding, so 1e-4 relative
(fp32's unit is 6e-8; a few denoising steps amplify it). bf16 rounds every weight and activation
to 8 significant bits (relative unit 2^-9 ~ 2e-3); 3e-2 is about ten such units, well below the
difference between two seeds (order 1).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from model.configs.spasemsr import build_tiny_pipeline
from model.pipeline.diffusion import SpaSemSRPipeline
from model.pipeline.performance import (
    PerformanceSettings,
    apply_performance,
    count_flops,
    relative_error,
)
from model.upscalers.spasemsr import SpaSemSRUpscaler

FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 3e-2


def _image(side: int) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8))


def _run(pipeline: SpaSemSRPipeline, *, tiled: bool, seed: int = 0) -> torch.Tensor:
    # tiled: a 64-px input x4 in 128-px tiles -> 16x16 latent tiles on a 32x32 latent (9 tiles)
    output = pipeline(
        _image(64 if tiled else 16),
        scale=4,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        tile_size=128 if tiled else None,
        output_type="pt",
    )
    images = output.images
    assert isinstance(images, torch.Tensor)
    return images


def _with(settings: PerformanceSettings) -> SpaSemSRPipeline:
    pipeline = build_tiny_pipeline(seed=0)
    apply_performance(pipeline, settings)
    return pipeline


@pytest.fixture(scope="module")
def reference() -> dict[bool, torch.Tensor]:
    """The straightforward (fp32, eager, reference attention, CFG apart) outputs."""
    pipeline = _with(PerformanceSettings.straightforward())
    return {tiled: _run(pipeline, tiled=tiled) for tiled in (False, True)}


@pytest.mark.parametrize(
    ("settings", "tolerance"),
    [
        (PerformanceSettings(attention="sdpa", cfg_batched=False), FP32_TOLERANCE),
        (PerformanceSettings(attention="math", cfg_batched=True), FP32_TOLERANCE),
        (PerformanceSettings(channels_last=True), FP32_TOLERANCE),
        (PerformanceSettings(tile_batch_size=4), FP32_TOLERANCE),
        (PerformanceSettings.optimised("cpu"), FP32_TOLERANCE),
        (PerformanceSettings(dtype=torch.bfloat16), BF16_TOLERANCE),
        (
            PerformanceSettings(
                dtype=torch.bfloat16,
                vae_dtype=torch.bfloat16,
                channels_last=True,
                tile_batch_size=9,
            ),
            BF16_TOLERANCE,
        ),
    ],
    ids=["sdpa", "cfg-batched", "channels-last", "tile-batch", "optimised-cpu", "bf16", "bf16-all"],
)
def test_setting_keeps_the_fp32_result(
    settings: PerformanceSettings, tolerance: float, reference: dict[bool, torch.Tensor]
) -> None:
    pipeline = _with(settings)
    for tiled in (False, True):
        output = _run(pipeline, tiled=tiled)
        assert output.shape == reference[tiled].shape
        assert torch.isfinite(output).all()
        assert relative_error(output, reference[tiled]) < tolerance
    # the tolerance is far tighter than what a different seed changes
    assert relative_error(_run(pipeline, tiled=False, seed=1), reference[False]) > 10 * tolerance


def test_compiled_unet_and_controlnet_trace_whole_and_match(
    reference: dict[bool, torch.Tensor],
) -> None:
    # Inductor's C++ build takes minutes on this CPU; the eager backend still runs Dynamo over the
    # UNet and ControlNet forwards, and fullgraph=True fails on any graph break in them.
    torch._dynamo.reset()
    settings = PerformanceSettings(compile=True, compile_backend="eager", fullgraph=True)
    pipeline = _with(settings)
    try:
        output = _run(pipeline, tiled=False)
    finally:
        torch._dynamo.reset()
    assert relative_error(output, reference[False]) < FP32_TOLERANCE


def test_apply_performance_converts_modules() -> None:
    settings = PerformanceSettings(dtype=torch.bfloat16, channels_last=True, tile_batch_size=3)
    pipeline = _with(settings)
    for name in ("unet", "controlnet", "unet_attention", "image_encoder", "semantic_encoder"):
        assert getattr(pipeline, name).dtype == torch.bfloat16, name
    assert pipeline.text_encoder.dtype == torch.bfloat16
    assert pipeline.vae.dtype == torch.float32
    weight = pipeline.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert not weight.is_contiguous()
    assert pipeline.performance is settings


def test_tiles_are_batched_by_shape() -> None:
    pipeline = build_tiny_pipeline(seed=0)
    tiles = pipeline._tiles(32, 32, 128, None)
    assert len(tiles) == 9
    pipeline.performance = PerformanceSettings(tile_batch_size=4)
    from model.pipeline.diffusion import _TileConditioning

    conditions = [_TileConditioning(tile, 0, (tile.height, tile.width), None) for tile in tiles]
    batches = pipeline._tile_batches(conditions)
    assert [len(batch.tiles) for batch in batches] == [4, 4, 1]
    assert [tile for batch in batches for tile in batch.tiles] == tiles


def test_presets_and_validation() -> None:
    plain = PerformanceSettings.straightforward()
    assert (plain.dtype, plain.vae_dtype, plain.attention) == (torch.float32,) * 2 + ("math",)
    assert not (plain.compile or plain.cfg_batched or plain.channels_last)
    assert plain.tile_batch_size == 1
    cuda = PerformanceSettings.optimised("cuda")
    assert (cuda.dtype, cuda.vae_dtype) == (torch.bfloat16, torch.bfloat16)
    assert cuda.compile and cuda.cuda_graphs and cuda.channels_last and cuda.cfg_batched
    assert cuda.compile_mode == "reduce-overhead"
    assert replace(cuda, autotune=True).compile_mode == "max-autotune"
    assert replace(cuda, cuda_graphs=False).compile_mode == "default"
    cpu = PerformanceSettings.optimised("cpu")
    assert cpu.dtype == torch.float32 and not cpu.compile and cpu.cfg_batched
    with pytest.raises(ValueError, match="cuda_graphs"):
        PerformanceSettings(cuda_graphs=True)
    with pytest.raises(ValueError, match="attention"):
        PerformanceSettings(attention="flash3")
    with pytest.raises(ValueError, match="tile_batch_size"):
        PerformanceSettings(tile_batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        PerformanceSettings(dtype=torch.int8)


def test_flop_counter_counts_every_stage() -> None:
    a = torch.randn(16, 32)
    with count_flops() as total:
        a @ torch.randn(32, 8)
        assert total() == 2 * 16 * 32 * 8
    pipeline = build_tiny_pipeline(seed=0)
    marks: dict[tuple[str, int], int] = {}
    with count_flops() as total:
        pipeline(
            _image(16),
            scale=4,
            num_inference_steps=2,
            callback=lambda stage, step, _: marks.__setitem__((stage, step), total()),
        )
        end = total()
    encode = marks[("encode", 1)]
    denoise = marks[("denoise", 2)] - encode
    one_step = marks[("denoise", 1)] - encode
    decode = end - marks[("denoise", 2)]
    assert encode > 0 and decode > 0
    assert denoise == 2 * one_step > 0  # every step does the same work


def test_warm_up_sizes_cover_a_full_tile_batch() -> None:
    pipeline = build_tiny_pipeline(seed=0)
    apply_performance(pipeline, PerformanceSettings(tile_batch_size=4))
    upscaler = SpaSemSRUpscaler(pipeline, weights="random")
    sizes = upscaler.warm_up_sizes(tile_size=128)
    assert sizes[0] == (32, 4)
    side, scale = sizes[1]
    cells = side * scale // pipeline.vae_scale_factor
    assert len(pipeline._tiles(cells, cells, 128, None)) >= 4


def test_worker_uses_optimised_settings_on_cuda_only() -> None:
    from core.settings import ModelSettings, Settings
    from worker.engine import _performance

    on = Settings(model=ModelSettings())
    assert _performance(on, "cpu") is None
    optimised = _performance(on, "cuda")
    assert optimised == PerformanceSettings.optimised("cuda")
    assert _performance(Settings(model=ModelSettings(optimise="off")), "cuda") is None
    half = _performance(Settings(model=ModelSettings(dtype="float16")), "cuda:0")
    assert half is not None
    assert (half.dtype, half.vae_dtype) == (torch.float16, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_optimised_cuda_settings_keep_the_fp32_result() -> None:
    straightforward = build_tiny_pipeline(seed=0).to("cuda")
    apply_performance(straightforward, PerformanceSettings.straightforward())
    optimised = build_tiny_pipeline(seed=0).to("cuda")
    apply_performance(optimised, PerformanceSettings.optimised("cuda"))
    for tiled in (False, True):
        expected = _run(straightforward, tiled=tiled)
        assert relative_error(_run(optimised, tiled=tiled), expected) < BF16_TOLERANCE
