"""``spasemsr eval`` with no data-set folder: bundled photographs, the trained Real-ESRGAN row."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.conftest import ROOT


def test_eval_on_bundled_photos_writes_tables_and_a_figure(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = subprocess.run(
        [
            sys.executable, "-m", "cli.main", "eval", "--no-spasemsr", "--photo", "chelsea",
            "--photo", "coffee", "--crop", "64", "--out", str(out),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "SPASEMSR_VAR_DIR": str(tmp_path / "var")},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Real-ESRGAN x4plus" in result.stdout
    with (out / "results.csv").open() as table:
        rows = list(csv.DictReader(table))
    ours = {row["method"]: row for row in rows if row.get("source") == "ours"}
    assert {"bicubic", "lanczos", "Real-ESRGAN x4plus"} <= set(ours)
    assert all(float(row["psnr"]) > 15 for row in ours.values())
    assert any("different data" in (row.get("note") or "") for row in rows)
    figure = Image.open(out / "comparison.png")
    assert figure.width > 3 * 64 and figure.height > 2 * 64
    # Converted once into the var folder, never into the repository.
    assert (tmp_path / "var" / "models" / "realesrgan-x4plus" / "config.json").is_file()


def test_eval_refuses_an_unknown_photo(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "eval", "--no-spasemsr", "--photo", "mona-lisa",
         "--out", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "SPASEMSR_VAR_DIR": str(tmp_path / "var")},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "mona-lisa" in result.stderr
    assert "Traceback" not in result.stderr
