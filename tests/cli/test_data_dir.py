"""Where the commands that run models on this machine keep their runtime files."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.local import offline_settings, user_data_dir
from tests.cli.test_cli import spasemsr
from tests.conftest import png_bytes


def test_the_data_directory_is_per_user_unless_spasemsr_var_dir_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPASEMSR_VAR_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert user_data_dir() == tmp_path / "cache" / "spasemsr"
    assert offline_settings().var_dir == tmp_path / "cache" / "spasemsr"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # invalid by the XDG rules: ignored
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_data_dir() == tmp_path / "home" / ".cache" / "spasemsr"
    monkeypatch.setenv("SPASEMSR_VAR_DIR", str(tmp_path / "chosen"))
    assert offline_settings().var_dir == tmp_path / "chosen"


def test_upscale_keeps_converted_weights_out_of_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real-ESRGAN's published weights are converted on first use: into the data directory."""
    monkeypatch.delenv("SPASEMSR_VAR_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("SPASEMSR_MODEL__CPU_THREADS", "1")
    work = tmp_path / "work"
    work.mkdir()
    (work / "in.png").write_bytes(png_bytes(12, 10))
    result = spasemsr(
        "upscale", "in.png", "out.png", "--model", "realesr-animevideov3", "--scale", "2",
        "--device", "cpu", "--lines", cwd=work,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in work.iterdir()) == ["in.png", "out.png"]
    assert (tmp_path / "cache" / "spasemsr" / "models" / "realesr-animevideov3").is_dir()
