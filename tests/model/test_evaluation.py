"""Tests of the evaluation protocol (model/evaluation/benchmark.py) on generated data sets."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.evaluation.benchmark import (
    PAPER_RESULTS,
    EvalDataset,
    ImagePair,
    SummaryRow,
    bicubic_upscale,
    centre_crop_pair,
    discover_dataset,
    evaluate,
    lanczos_upscale,
    make_degraded_patch_set,
    paper_rows,
    render_markdown,
    upscale_fn,
    write_tables,
)
from model.evaluation.metrics import LPIPS, LPIPSNetwork, MetricStatus, psnr, ssim
from model.upscalers.lanczos import LanczosUpscaler
from tests.model.builders import make_synthetic_dataset, synthetic_image

SMALL = (64, 48)  # HR size of the generated sets: LR 16 x 12


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small generated set per layout (bicubic LR keeps generation fast)."""
    root = tmp_path_factory.mktemp("sets")
    return {
        layout: make_synthetic_dataset(
            root / layout, layout, count=3, hr_size=SMALL, seed=1, degradation="bicubic"
        )
        for layout in ("realsr", "drealsr", "gt_lq", "lr_only")
    }


# --- discovery --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["realsr", "drealsr", "gt_lq", "lr_only"])
def test_each_layout_is_discovered(sets: dict[str, Path], layout: str) -> None:
    dataset = discover_dataset(sets[layout])
    assert dataset.layout == layout
    assert len(dataset.pairs) == 3
    assert dataset.has_reference == (layout != "lr_only")
    for pair in dataset.pairs:
        assert pair.lr.is_file()
        if pair.hr is not None:
            with Image.open(pair.hr) as hr, Image.open(pair.lr) as lr:
                assert hr.size == (lr.width * 4, lr.height * 4)


def test_realsr_pairs_by_camera_and_scale(sets: dict[str, Path]) -> None:
    dataset = discover_dataset(sets["realsr"])
    names = [p.name for p in dataset.pairs]
    assert names == ["Canon/Test/4/Canon_001", "Canon/Test/4/Canon_003", "Nikon/Test/4/Nikon_002"]
    assert all(p.lr.name.endswith("_LR4.png") and p.hr is not None for p in dataset.pairs)
    # Only x4 pairs exist: asking for x2 finds nothing.
    with pytest.raises(ValueError, match="no test images"):
        discover_dataset(sets["realsr"], scale=2)


def test_drealsr_pairs_x1_with_x4(sets: dict[str, Path]) -> None:
    dataset = discover_dataset(sets["drealsr"])
    pair = dataset.pairs[0]
    assert pair.name == "synthetic_0001"
    assert pair.hr is not None and pair.hr.name == "synthetic_0001_x1.png"
    assert pair.lr.name == "synthetic_0001_x4.png"
    # The test_x4 folder itself also works as the root.
    assert len(discover_dataset(sets["drealsr"] / "test_x4").pairs) == 3


def test_benchmark_comes_from_the_name(sets: dict[str, Path]) -> None:
    assert discover_dataset(sets["gt_lq"], name="DIV2K-val").benchmark == "DIV2K-Val"
    assert discover_dataset(sets["drealsr"], name="DRealSR").benchmark == "DRealSR"
    assert discover_dataset(sets["gt_lq"], name="mine").benchmark is None
    assert discover_dataset(sets["gt_lq"], name="x", benchmark="RealSR").benchmark == "RealSR"


def test_missing_or_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        discover_dataset(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no test images"):
        discover_dataset(tmp_path / "empty")


# --- protocol ---------------------------------------------------------------------------------


def test_centre_crop_pairs_the_matching_regions() -> None:
    hr = synthetic_image((160, 120), seed=3)
    lr = hr.reduce(4)  # exact 4x4 means: LR pixel (i, j) is HR block (4i, 4j)
    lr_patch, hr_patch = centre_crop_pair(lr, hr, scale=4, lr_crop=16)
    assert lr_patch.size == (16, 16) and hr_patch is not None and hr_patch.size == (64, 64)
    assert np.array_equal(np.asarray(hr_patch.reduce(4)), np.asarray(lr_patch))
    # The crop is centred: (40 - 16) / 2 = 12 and (30 - 16) / 2 = 7 LR pixels in.
    assert np.array_equal(np.asarray(lr_patch), np.asarray(lr.crop((12, 7, 28, 23))))


def test_centre_crop_of_a_small_or_registered_lr() -> None:
    hr = synthetic_image((64, 48), seed=4)
    lr_patch, hr_patch = centre_crop_pair(hr.reduce(4), hr, scale=4, lr_crop=128)
    assert lr_patch.size == (16, 12) and hr_patch is not None and hr_patch.size == (64, 48)
    # An LR registered at the HR's size (early RealSR) is down-scaled by the scale first.
    lr_patch, hr_patch = centre_crop_pair(hr, hr, scale=4, lr_crop=8)
    assert lr_patch.size == (8, 8) and hr_patch is not None and hr_patch.size == (32, 32)
    # No reference: only the LR is cropped.
    lr_patch, none = centre_crop_pair(hr, None, scale=4, lr_crop=10)
    assert lr_patch.size == (10, 10) and none is None


def test_baselines_and_the_upscaler_adapter() -> None:
    image = synthetic_image((12, 10), seed=5)
    assert bicubic_upscale(image, 4).size == (48, 40)
    adapted = upscale_fn(LanczosUpscaler())
    assert np.array_equal(np.asarray(adapted(image, 4)), np.asarray(lanczos_upscale(image, 4)))


# --- evaluation -------------------------------------------------------------------------------


def _noisy_upscale(image: Image.Image, scale: int) -> Image.Image:
    up = np.asarray(bicubic_upscale(image, scale), dtype=np.float64)
    noise = np.random.default_rng(0).normal(0, 40, up.shape)
    return Image.fromarray(np.clip(up + noise, 0, 255).astype(np.uint8))


def test_evaluate_writes_tables_with_paper_rows_and_baselines(
    sets: dict[str, Path], tmp_path: Path
) -> None:
    realsr = discover_dataset(sets["realsr"], name="RealSR")
    reallr = discover_dataset(sets["lr_only"], name="RealLR200")
    report = evaluate(
        [realsr, reallr],
        {"noisy": _noisy_upscale},
        out_dir=tmp_path / "out",
        lr_crop=8,
    )
    ours = [r for r in report.rows if r.source == "ours"]
    assert {(r.dataset, r.method) for r in ours} == {
        (d, m) for d in ("RealSR", "RealLR200") for m in ("noisy", "bicubic", "lanczos")
    }
    # The metrics are the means of the protocol computed directly.
    bicubic = report.row("RealSR", "bicubic")
    expected_psnr, expected_ssim = [], []
    for pair in realsr.pairs:
        assert pair.hr is not None
        lr, hr = centre_crop_pair(Image.open(pair.lr), Image.open(pair.hr), scale=4, lr_crop=8)
        assert hr is not None
        expected_psnr.append(psnr(bicubic_upscale(lr, 4), hr, crop_border=4))
        expected_ssim.append(ssim(bicubic_upscale(lr, 4), hr, crop_border=4))
    assert bicubic.metrics["psnr"] == pytest.approx(float(np.mean(expected_psnr)))
    assert bicubic.metrics["ssim"] == pytest.approx(float(np.mean(expected_ssim)))
    assert report.row("RealSR", "noisy").metrics["psnr"] < bicubic.metrics["psnr"]  # type: ignore[operator]
    # No reference: no PSNR.
    assert report.row("RealLR200", "bicubic").metrics["psnr"] is None
    # The paper's RealSR rows, not for RealLR200 (no published numbers there).
    paper = [r for r in report.rows if r.source == "paper"]
    assert {r.benchmark for r in paper} == {"RealSR"}
    spasemsr = report.row("RealSR", "SpaSemSR", source="paper")
    assert spasemsr.metrics["psnr"] == 25.74 and spasemsr.metrics["maniqa"] == 0.4637

    markdown = report.markdown_path.read_text(encoding="utf-8")
    assert markdown == report.markdown
    assert "| RealSR (paper) | SpaSemSR | paper | – | 25.74 | 0.7306 |" in markdown
    assert "| RealSR | bicubic | ours | 3 |" in markdown
    assert "Skipped metrics:" in markdown and "musiq" in markdown
    with report.csv_path.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(report.rows)
    csv_bicubic = next(r for r in rows if r["dataset"] == "RealSR" and r["method"] == "bicubic")
    assert float(csv_bicubic["psnr"]) == pytest.approx(bicubic.metrics["psnr"])
    with report.per_image_csv_path.open(encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == 2 * 3 * 3


def test_evaluate_with_a_learned_metric_and_saved_images(
    sets: dict[str, Path], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    network = LPIPSNetwork("alex")
    for weight in network.lins.parameters():
        torch.nn.init.uniform_(weight, 0.0, 1.0)
    report = evaluate(
        [discover_dataset(sets["gt_lq"], name="DIV2K-Val")],
        {},
        out_dir=tmp_path,
        metrics=("psnr", "lpips", "musiq"),
        learned_metrics={"lpips": LPIPS(network)},
        lr_crop=None,
        paper="spasemsr",
        max_images=2,
        save_images=True,
    )
    row = report.row("DIV2K-Val", "lanczos")
    assert row.images == 2 and row.metrics["ssim"] is None
    assert row.metrics["lpips"] is not None and row.metrics["lpips"] > 0
    assert [r.method for r in report.rows if r.source == "paper"] == ["SpaSemSR"]
    assert {s.name: s.available for s in report.metric_status} == {"lpips": True, "musiq": False}
    saved = sorted((tmp_path / "images" / "DIV2K-Val" / "bicubic").glob("*.png"))
    assert [p.name for p in saved] == ["0000000.png", "0000001.png"]
    assert Image.open(saved[0]).size == SMALL
    assert "LPIPS↓" in report.markdown


def test_evaluate_rejects_a_wrong_size_upscaler(sets: dict[str, Path], tmp_path: Path) -> None:
    def broken(image: Image.Image, scale: int) -> Image.Image:
        return image

    with pytest.raises(ValueError, match="'broken' returned"):
        evaluate([sets["gt_lq"]], {"broken": broken}, out_dir=tmp_path, include_baselines=False)
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate([sets["gt_lq"]], {}, out_dir=tmp_path, metrics=("fid",))  # type: ignore[arg-type]


def test_identity_pairs_score_perfectly(tmp_path: Path) -> None:
    """An upscaler that recovers the HR exactly gets infinite PSNR and SSIM 1."""
    hr = synthetic_image((64, 64), seed=9)
    hr.save(tmp_path / "hr.png")
    lr = hr.reduce(4)
    lr.save(tmp_path / "lr.png")
    dataset = EvalDataset(
        name="one",
        layout="gt_lq",
        scale=4,
        pairs=(ImagePair(name="a", lr=tmp_path / "lr.png", hr=tmp_path / "hr.png"),),
    )

    def oracle(image: Image.Image, scale: int) -> Image.Image:
        return hr.copy()

    report = evaluate(
        [dataset], {"oracle": oracle}, out_dir=tmp_path / "o", metrics=("psnr", "ssim")
    )
    row = report.row("one", "oracle")
    assert row.metrics["psnr"] == math.inf and row.metrics["ssim"] == pytest.approx(1.0)
    assert "| one | oracle | ours | 1 | inf | 1.0000 |" in report.markdown


def test_paper_numbers_match_design_section_1_5() -> None:
    """DESIGN 1.5 quotes SpaSemSR and the best peer on PSNR per set; the tables must agree."""
    assert PAPER_RESULTS["DIV2K-Val"]["SpaSemSR"] == (21.31, 0.5340, 0.6932, 63.32, 0.4945)
    assert PAPER_RESULTS["RealSR"]["SpaSemSR"] == (25.74, 0.7306, 0.5893, 62.96, 0.4637)
    assert PAPER_RESULTS["DRealSR"]["SpaSemSR"] == (28.97, 0.7826, 0.5630, 55.79, 0.3998)
    best = {
        name: max(rows.items(), key=lambda item: item[1][0]) for name, rows in PAPER_RESULTS.items()
    }
    assert (best["DIV2K-Val"][0], best["DIV2K-Val"][1][:2]) == ("Real-ESRGAN", (21.86, 0.5746))
    assert (best["RealSR"][0], best["RealSR"][1][:2]) == ("BSRGAN", (26.38, 0.7651))
    # On DRealSR SpaSemSR itself leads on PSNR; the best peer is BSRGAN.
    peers = {k: v for k, v in PAPER_RESULTS["DRealSR"].items() if k != "SpaSemSR"}
    top = max(peers.items(), key=lambda item: item[1][0])
    assert (top[0], top[1][:2]) == ("BSRGAN", (28.70, 0.8028))
    assert all(len(rows) == 10 for rows in PAPER_RESULTS.values())


def test_degraded_patch_set_in_the_stablesr_layout(tmp_path: Path) -> None:
    (tmp_path / "hr").mkdir()
    for index in range(2):
        synthetic_image((80, 72), seed=index).save(tmp_path / "hr" / f"{index:04d}.png")
    out = make_degraded_patch_set(tmp_path / "hr", tmp_path / "set", count=3, patch=64, seed=2)
    dataset = discover_dataset(out, name="DIV2K-Val")
    assert dataset.layout == "gt_lq" and len(dataset.pairs) == 3
    assert dataset.benchmark == "DIV2K-Val"
    assert Image.open(out / "gt" / "0000002.png").size == (64, 64)
    assert Image.open(out / "lq" / "0000002.png").size == (16, 16)
    again = make_degraded_patch_set(tmp_path / "hr", tmp_path / "again", count=3, patch=64, seed=2)
    assert np.array_equal(
        np.asarray(Image.open(out / "lq" / "0000001.png")),
        np.asarray(Image.open(again / "lq" / "0000001.png")),
    )


def test_synthetic_sets_are_reproducible(tmp_path: Path) -> None:
    a = make_synthetic_dataset(tmp_path / "a", "gt_lq", count=1, hr_size=(32, 32), seed=4)
    b = make_synthetic_dataset(tmp_path / "b", "gt_lq", count=1, hr_size=(32, 32), seed=4)
    for folder in ("gt", "lq"):
        first = np.asarray(Image.open(a / folder / "0000000.png"))
        second = np.asarray(Image.open(b / folder / "0000000.png"))
        assert np.array_equal(first, second)
    assert Image.open(a / "lq" / "0000000.png").size == (8, 8)
    with pytest.raises(ValueError, match="multiple of the scale"):
        make_synthetic_dataset(tmp_path / "c", "gt_lq", hr_size=(30, 32))


def test_row_notes_and_a_custom_protocol_reach_the_tables(tmp_path: Path) -> None:
    ours = SummaryRow(
        dataset="mine", benchmark=None, method="m", source="ours", images=2, metrics={"psnr": 20.0}
    )
    paper = paper_rows("RealSR", "mine", "spasemsr", note="other data")
    assert [r.note for r in paper] == ["other data"]
    report = write_tables(
        tmp_path,
        [ours, *paper],
        [],
        [MetricStatus(name="musiq", available=False, reason="no weights")],
        {},
        markdown=render_markdown([ours, *paper], [], {}, protocol=["Protocol: mine."]),
    )
    assert "| RealSR (paper) | SpaSemSR | paper, other data | – | 25.74 |" in report.markdown
    assert "Protocol: mine." in report.markdown and "Paper rows:" not in report.markdown
    assert report.markdown_path.read_text(encoding="utf-8") == report.markdown
    assert report.figure_path is None
    with report.csv_path.open(encoding="utf-8") as handle:
        assert [r["note"] for r in csv.DictReader(handle)] == ["", "other data"]
    # No protocol notes at all, but skipped metrics are still listed after a blank line.
    bare = render_markdown(
        [ours], [MetricStatus(name="musiq", available=False, reason="x")], {}, protocol=()
    )
    assert bare.endswith("| mine | m | ours | 2 | 20.00 |\n\nSkipped metrics:\n- musiq: x\n")
