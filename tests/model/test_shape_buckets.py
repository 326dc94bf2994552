"""Shape buckets (:mod:`model.pipeline.performance`): a compiled worker serves a fixed set of
denoiser shapes, all compiled at warm-up, whatever the image size, tile size, guidance or scheduler
of a request; padding a tile up to its bucket keeps the result close to the unpadded run.

Tolerances: a tile with nothing to pad gives exactly the unpadded result. A padded tile is not
exact, because the mirrored context enters the UNet's attention and GroupNorm statistics; with
the tiny model's random weights that moves the output by about 4% (relative), against 30-35% for
another seed, so the test allows 8% and a quarter of the seed's change.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from model.configs.spasemsr import build_tiny_pipeline
from model.pipeline.diffusion import SpaSemSRPipeline, _TileConditioning, reflect_pad_to
from model.pipeline.performance import (
    PerformanceSettings,
    apply_performance,
    compiled_graph_count,
    relative_error,
    tile_bucket,
)
from model.pipeline.tiling import Tile
from model.upscalers.base import UpscaleOptions
from model.upscalers.spasemsr import SpaSemSRUpscaler
from tests.model.test_pipeline import run, smooth_image

TINY_BUCKETS = (64, 128)
"""Multiples of the tiny pipeline's 16-pixel multiple; 128 is its UNet's sample size."""

PADDED_TOLERANCE = 0.08


def _bucketed(**settings: object) -> SpaSemSRPipeline:
    pipeline = build_tiny_pipeline(seed=0)
    apply_performance(pipeline, PerformanceSettings(tile_buckets=TINY_BUCKETS, **settings))  # type: ignore[arg-type]
    return pipeline


def test_client_tile_sizes_map_onto_the_buckets() -> None:
    buckets = (256, 512)
    # the API's range: 256..1024 in steps of 64; never larger than asked
    mapped = {size: tile_bucket(buckets, size) for size in range(256, 1025, 64)}
    assert {size for size, side in mapped.items() if side == 256} == set(range(256, 512, 64))
    assert {size for size, side in mapped.items() if side == 512} == set(range(512, 1025, 64))
    assert tile_bucket(buckets, 128) == 256  # below every bucket: the smallest
    assert tile_bucket(buckets, 512 // 2) == 256  # the out-of-memory retry's halving
    with pytest.raises(ValueError):
        tile_bucket((), 512)


def test_batch_sizes_come_from_a_fixed_set() -> None:
    cuda = PerformanceSettings.optimised("cuda")
    assert cuda.tile_buckets == (256, 512)
    assert cuda.tile_counts == (1, 2, 4, 8)
    assert cuda.forward_batches == (1, 2, 4, 8, 16)  # without and with classifier-free guidance
    assert PerformanceSettings(tile_batch_size=3).tile_counts == (1, 2, 3)
    apart = PerformanceSettings(tile_batch_size=4, cfg_batched=False)
    assert apart.forward_batches == (1, 2, 4)
    assert PerformanceSettings.optimised("cpu").tile_buckets == ()
    with pytest.raises(ValueError, match="tile_buckets"):
        PerformanceSettings(tile_buckets=(512, 256))
    with pytest.raises(ValueError, match="multiples"):
        apply_performance(build_tiny_pipeline(seed=0), PerformanceSettings(tile_buckets=(72,)))


@pytest.mark.parametrize(("count", "sizes"), [(25, [8, 8, 8, 1]), (7, [4, 2, 1]), (9, [8, 1])])
def test_tiles_split_into_served_batch_sizes(count: int, sizes: list[int]) -> None:
    pipeline = _bucketed(tile_batch_size=8)
    conditions = [_TileConditioning(Tile(0, i, 8, 8), 0, (16, 16), None) for i in range(count)]
    batches = pipeline._tile_batches(conditions)
    assert [len(batch.tiles) for batch in batches] == sizes
    assert [tile for batch in batches for tile in batch.tiles] == [c.tile for c in conditions]


def test_reflect_padding_mirrors_and_keeps_the_tile() -> None:
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    padded = reflect_pad_to(x, 6, 9)
    assert padded.shape == (1, 1, 6, 9)
    assert torch.equal(padded[..., :3, :4], x)
    assert padded[0, 0, 0, :].tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2]  # mirrored again past 2x
    assert padded[0, 0, :, 0].tolist() == [0, 4, 8, 4, 0, 4]
    single = reflect_pad_to(torch.full((1, 2, 1, 1), 5.0), 4, 4)
    assert single.shape == (1, 2, 4, 4) and bool((single == 5).all())
    assert reflect_pad_to(x, 3, 4) is x


def test_small_images_get_the_smallest_bucket_that_holds_them() -> None:
    pipeline = _bucketed()
    assert pipeline.tile_side(128, 40, 28) == 64  # padded to 48 x 32: fits 64
    assert pipeline.tile_side(128, 120, 88) == 128
    assert pipeline.tile_side(96, 500, 500) == 64  # 96 maps down to 64
    assert pipeline.tile_side(None, 500, 500) == 128  # untiled: the largest bucket
    assert build_tiny_pipeline(seed=0).tile_side(96, 500, 500) == 96  # no buckets: as asked
    assert pipeline.served_shapes() == [(batch, side, side) for side in (8, 16) for batch in (1, 2)]


def test_tiles_that_fill_their_bucket_give_the_unbucketed_result(
    tiny_pipeline: SpaSemSRPipeline,
) -> None:
    image = smooth_image(64, 64)  # 256 x 256 output, 9 latent tiles of 16 x 16
    assert torch.equal(
        run(_bucketed(), image, tile_size=128), run(tiny_pipeline, image, tile_size=128)
    )


@pytest.mark.parametrize(
    ("size", "scale"),
    [((30, 22), 4), ((60, 20), 4), ((20, 60), 4)],
    ids=["one-tile", "padded-rows", "padded-columns"],
)
def test_padded_tiles_stay_close_to_the_unpadded_run(
    tiny_pipeline: SpaSemSRPipeline, size: tuple[int, int], scale: int
) -> None:
    image = smooth_image(*size)
    bucketed = run(_bucketed(), image, scale=scale, tile_size=128)
    plain = run(tiny_pipeline, image, scale=scale, tile_size=128)
    assert bucketed.shape == plain.shape == (1, 3, size[1] * scale, size[0] * scale)
    other_seed = run(tiny_pipeline, image, scale=scale, tile_size=128, seed=1)
    error = relative_error(bucketed, plain)
    assert error < PADDED_TOLERANCE
    assert error < 0.25 * relative_error(other_seed, plain)


def test_no_compilation_after_warm_up() -> None:
    """Varied image sizes, tile sizes, scales, guidance and schedulers after the warm-up: not one
    graph more. The eager backend keeps it fast; Dynamo's tracing and guards are the same as
    with Inductor, so are its recompilations."""
    # Restored by hand: pytest's monkeypatch would delete the key of Dynamo's config module on
    # undo (the module serves its keys through __getattr__), breaking later compilations.
    config = torch._dynamo.config
    limit = config.recompile_limit
    torch._dynamo.reset()
    try:
        pipeline = build_tiny_pipeline(seed=0)
        settings = PerformanceSettings(
            compile=True, compile_backend="eager", tile_buckets=TINY_BUCKETS, tile_batch_size=2
        )
        apply_performance(pipeline, settings)
        upscaler = SpaSemSRUpscaler(pipeline, weights="random")
        upscaler.warm_up()
        report = upscaler.warm_up_report
        assert report is not None
        assert list(report.shapes) == pipeline.served_shapes()
        assert len(report.shapes) == 6 and report.graphs >= 2 * len(report.shapes)
        assert report.compile_seconds > 0 and report.seconds >= report.compile_seconds
        graphs = compiled_graph_count()
        requests = [
            ((5, 7), UpscaleOptions(scale=2, steps=1, tile_size=256, seed=0)),
            ((30, 22), UpscaleOptions(scale=4, steps=1, tile_size=128, seed=0)),
            ((48, 48), UpscaleOptions(scale=4, steps=1, tile_size=64, seed=0)),
            ((60, 20), UpscaleOptions(scale=4, steps=2, tile_size=96, scheduler="ddim", seed=0)),
            ((40, 33), UpscaleOptions(scale=2, steps=1, tile_size=1024, guidance_scale=1.0)),
            ((33, 20), UpscaleOptions(scale=2, steps=2, tile_size=200, scheduler="unipc")),
        ]
        for size, options in requests:
            result = upscaler.upscale(Image.new("RGB", size, (90, 140, 200)), options)
            assert result.image.size == (size[0] * options.scale, size[1] * options.scale)
        assert compiled_graph_count() == graphs
    finally:
        config.recompile_limit = limit
        torch._dynamo.reset()


def test_warm_up_without_compilation_reports_no_shapes() -> None:
    upscaler = SpaSemSRUpscaler(_bucketed(), weights="random")
    upscaler.warm_up()
    report = upscaler.warm_up_report
    assert report is not None and report.shapes == () and report.graphs == 0
    assert report.describe()["seconds"] >= 0
