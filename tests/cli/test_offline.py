"""`spasemsr eval` and `spasemsr weights` on this machine (tiny models, generated data)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.model.builders import make_synthetic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval") / "RealSR"
    return make_synthetic_dataset(root, "realsr", count=2, hr_size=(192, 160), seed=3)


def test_eval_baselines_table(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPASEMSR_VAR_DIR", str(tmp_path / "var"))
    result = CliRunner().invoke(
        app, ["eval", str(dataset), "--out", str(tmp_path), "--no-spasemsr"]
    )
    assert result.exit_code == 0, result.output
    table = (tmp_path / "results.md").read_text()
    assert "bicubic" in table and "lanczos" in table and "Real-ESRGAN x4plus" in table
    assert "25.74" in table  # the paper's RealSR PSNR stands beside ours
    assert (tmp_path / "results.csv").read_text().count("\n") >= 3


def test_eval_runs_spasemsr(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPASEMSR_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("SPASEMSR_MODEL__CPU_THREADS", "1")
    result = CliRunner().invoke(
        app,
        ["eval", str(dataset), "--out", str(tmp_path / "out"), "--steps", "1",
         "--max-images", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    table = (tmp_path / "out" / "results.md").read_text()
    # The demo weights are untrained, and the row says so.
    assert "SpaSemSR (untrained weights)" in table and "SpaSemSR (ours)" not in table


def test_weights_reports_a_missing_base_as_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["weights", str(tmp_path / "out"), "--base", str(tmp_path / "no-such-folder")]
    )
    assert result.exit_code == 2
    assert "cannot assemble" in result.output
