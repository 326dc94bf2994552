"""Your own weights: published-layout checkpoints and converted folders load and run unchanged.

RRDBNet key layouts themselves are covered in ``tests/model/grounding/test_drm.py``; here the
SRVGGNetCompact layout (``realesr-animevideov3.pth``: ``params``) is spelled out independently,
and every layout goes through the upscaler's loader and must give the saved module's output.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model.grounding.drm import RRDBNet
from model.upscalers.base import UpscaleOptions
from model.upscalers.realesrgan import RealESRGANUpscaler, SRVGGNetCompact
from model.upscalers.realesrgan.upscaler import image_to_tensor

from ..grounding.test_drm import published_state_dict
from .conftest import photo

FEATURES, CONVS = 4, 2


def published_srvgg_state(seed: int = 0, *, upscale: int = 4) -> dict[str, torch.Tensor]:
    """xinntao's ``SRVGGNetCompact`` keys: ``body.0`` conv, ``body.1`` PReLU, ..., last conv."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    channels = [3] + [FEATURES] * (CONVS + 1)
    index = 0
    for cin, cout in itertools.pairwise(channels):
        state[f"body.{index}.weight"] = torch.randn(cout, cin, 3, 3, generator=generator) * 0.1
        state[f"body.{index}.bias"] = torch.randn(cout, generator=generator) * 0.01
        state[f"body.{index + 1}.weight"] = torch.rand(cout, generator=generator) * 0.3
        index += 2
    state[f"body.{index}.weight"] = torch.randn(3 * upscale**2, FEATURES, 3, 3, generator=generator)
    state[f"body.{index}.bias"] = torch.zeros(3 * upscale**2)
    return state


def test_srvgg_module_keys_are_the_published_ones() -> None:
    module = SRVGGNetCompact(num_features=FEATURES, num_convs=CONVS, upscale=4)
    expected = {key: tuple(value.shape) for key, value in published_srvgg_state().items()}
    assert {key: tuple(value.shape) for key, value in module.state_dict().items()} == expected
    # The published default: 64 features, 16 convs -> body.0 ... body.34.
    keys = SRVGGNetCompact().state_dict()
    assert "body.33.weight" in keys and "body.34.bias" in keys and "body.35.weight" not in keys


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_srvgg_checkpoint_loads_and_runs_like_its_weights(tmp_path: Path, suffix: str) -> None:
    state = published_srvgg_state()
    path = tmp_path / f"realesr-animevideov3{suffix}"
    if suffix == ".pth":
        torch.save({"params": state}, path)  # the published file's wrapper
    else:
        save_file(state, path)
    model = SRVGGNetCompact.from_published_checkpoint(path)
    assert (model.config.num_features, model.config.num_convs, model.config.upscale) == (4, 2, 4)
    reference = SRVGGNetCompact(num_features=FEATURES, num_convs=CONVS, upscale=4).eval()
    reference.load_state_dict(state)
    image = torch.rand(1, 3, 10, 7)
    with torch.no_grad():
        assert torch.equal(model(image), reference(image))


@pytest.mark.parametrize(
    ("layout", "wrapper"),
    [
        ("basicsr", "params_ema"),  # RealESRGAN_x4plus.pth / RealESRNet_x4plus.pth
        ("kair", None),  # BSRNet.pth: a bare state dict with ESRGAN's legacy names
        ("srvgg", "params"),  # realesr-animevideov3.pth
    ],
)
def test_upscaler_serves_your_checkpoint_exactly(
    tmp_path: Path, layout: str, wrapper: str | None
) -> None:
    if layout == "srvgg":
        state = published_srvgg_state()
        module: torch.nn.Module = SRVGGNetCompact(num_features=FEATURES, num_convs=CONVS)
        module.load_state_dict(state)
    else:
        state = published_state_dict(layout=layout)
        module = RRDBNet.from_published_checkpoint(_save(tmp_path / "ref.pth", state, None))
    path = _save(tmp_path / "mine.pth", state, wrapper)
    upscaler = RealESRGANUpscaler.from_weights(path, name="realesrgan-x4plus")
    card = upscaler.card
    assert card.trained and card.name == "realesrgan-x4plus" and card.scales == (2, 3, 4)
    assert str(tmp_path) not in card.weights  # a file name at most, never a path
    image = photo(13, 9)
    served = upscaler.upscale(image, UpscaleOptions(scale=4)).image
    with torch.no_grad():
        direct = module.eval()(image_to_tensor(image))
    expected = direct[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(served), expected)


def test_a_converted_folder_of_your_own_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = SRVGGNetCompact(num_features=FEATURES, num_convs=CONVS, upscale=2).eval()
    net.save_pretrained(tmp_path / "my-model")
    upscaler = RealESRGANUpscaler.from_weights(tmp_path / "my-model")
    assert upscaler.card.name == "my-model" and upscaler.card.scales == (2,)
    image = photo(11, 7)
    with torch.no_grad():
        direct = net(image_to_tensor(image))
    expected = direct[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    served = upscaler.upscale(image, UpscaleOptions(scale=2)).image
    assert np.array_equal(np.asarray(served), expected)
    with pytest.raises(ValueError, match="serves scales"):
        upscaler.upscale(image, UpscaleOptions(scale=4))


def test_unknown_checkpoints_are_refused(tmp_path: Path) -> None:
    torch.save({"params": {"encoder.weight": torch.zeros(3, 3)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="neither RRDBNet nor SRVGGNetCompact"):
        RealESRGANUpscaler.from_checkpoint(tmp_path / "other.pth")
    state = published_srvgg_state()
    del state["body.1.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="no PReLU weights"):
        RealESRGANUpscaler.from_checkpoint(tmp_path / "broken.pth")


def _save(path: Path, state: dict[str, torch.Tensor], wrapper: str | None) -> Path:
    torch.save({wrapper: state} if wrapper else state, path)
    return path
