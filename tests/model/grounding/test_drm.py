"""RRDBNet loads the published key layouts; tiled inference equals untiled inference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.grounding.drm import RRDBNet, load_published_state_dict, tiled_forward

FEATURES, GROWTH, BLOCKS = 8, 4, 2


def published_state_dict(
    *, layout: str, in_channels: int = 3, upsamples: int = 2, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Keys and shapes spelled out as in the published files, written independently of RRDBNet.

    ``basicsr``: RealESRNet_x4plus / x2plus (Real-ESRGAN); ``kair``: BSRNet (BSRGAN / KAIR).
    """
    generator = torch.Generator().manual_seed(seed)

    def conv(cin: int, cout: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = torch.randn(cout, cin, 3, 3, generator=generator) * 0.05
        return weight, torch.randn(cout, generator=generator) * 0.01

    names = {
        "basicsr": ("body", "rdb", "conv_body", "conv_up{}", "conv_hr"),
        "kair": ("RRDB_trunk", "RDB", "trunk_conv", "upconv{}", "HRconv"),
    }[layout]
    trunk, rdb, body, up, hr = names
    state: dict[str, torch.Tensor] = {}

    def put(name: str, cin: int, cout: int) -> None:
        state[f"{name}.weight"], state[f"{name}.bias"] = conv(cin, cout)

    put("conv_first", in_channels, FEATURES)
    for block in range(BLOCKS):
        for index in (1, 2, 3):
            for layer in range(1, 6):
                cin = FEATURES + (layer - 1) * GROWTH
                cout = FEATURES if layer == 5 else GROWTH
                put(f"{trunk}.{block}.{rdb}{index}.conv{layer}", cin, cout)
    put(body, FEATURES, FEATURES)
    for step in range(1, upsamples + 1):
        put(up.format(step), FEATURES, FEATURES)
    put(hr, FEATURES, FEATURES)
    put("conv_last", FEATURES, 3)
    return state


@pytest.mark.parametrize(
    ("layout", "in_channels", "upsamples", "scale", "unshuffle"),
    [
        ("basicsr", 3, 2, 4, 1),  # RealESRNet_x4plus
        ("basicsr", 12, 2, 2, 2),  # RealESRNet_x2plus: pixel-unshuffle by 2 in front
        ("kair", 3, 2, 4, 1),  # BSRNet x4
        ("kair", 3, 1, 2, 1),  # KAIR's x2 variant: a single upsampling step
    ],
)
def test_loads_published_layouts(
    tmp_path: Path, layout: str, in_channels: int, upsamples: int, scale: int, unshuffle: int
) -> None:
    state = published_state_dict(layout=layout, in_channels=in_channels, upsamples=upsamples)
    path = tmp_path / "weights.pth"
    # Real-ESRGAN wraps its weights in "params_ema"; BSRNet.pth is a bare state dict.
    torch.save({"params_ema": state} if layout == "basicsr" else state, path)
    model = RRDBNet.from_published_checkpoint(path)
    assert (model.config.scale, model.config.unshuffle) == (scale, unshuffle)
    assert model.config.num_blocks == BLOCKS and model.config.num_features == FEATURES
    loaded = model.state_dict()
    assert len(loaded) == len(state)
    original_first = state["conv_first.weight"]
    assert torch.equal(loaded["conv_first.weight"], original_first)
    rdb = "body.1.rdb3.conv5.weight" if layout == "basicsr" else "RRDB_trunk.1.RDB3.conv5.weight"
    assert torch.equal(loaded["body.1.rdb3.conv5.weight"], state[rdb])
    image = torch.rand(1, 3, 12, 10)
    assert model(image).shape == (1, 3, 12 * scale, 10 * scale)


def test_safetensors_checkpoint_loads_like_pth(tmp_path: Path) -> None:
    state = published_state_dict(layout="basicsr")
    save_file(state, tmp_path / "weights.safetensors")
    torch.save({"params": state}, tmp_path / "weights.pth")
    from_safetensors = load_published_state_dict(tmp_path / "weights.safetensors")
    from_pth = load_published_state_dict(tmp_path / "weights.pth")
    assert from_safetensors.keys() == from_pth.keys()
    assert all(torch.equal(from_safetensors[k], from_pth[k]) for k in from_pth)


def test_published_checkpoint_rejects_missing_keys(tmp_path: Path) -> None:
    state = published_state_dict(layout="basicsr")
    del state["conv_hr.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match=r"conv_hr\.weight"):
        RRDBNet.from_published_checkpoint(tmp_path / "broken.pth")


@pytest.mark.parametrize(("scale", "unshuffle"), [(4, 1), (2, 2), (2, 1)])
def test_tiled_equals_untiled_when_the_image_fits_one_tile(scale: int, unshuffle: int) -> None:
    torch.manual_seed(0)
    model = RRDBNet(
        num_features=8, num_blocks=1, growth_channels=4, scale=scale, unshuffle=unshuffle
    )
    image = torch.rand(1, 3, 24, 20)
    with torch.no_grad():
        whole = model(image)
    tiled = tiled_forward(model.eval(), image, tile=32, overlap=8)
    assert torch.equal(tiled, whole)


@pytest.mark.parametrize(("scale", "unshuffle"), [(4, 1), (2, 2)])
def test_tiles_with_enough_context_equal_one_pass(scale: int, unshuffle: int) -> None:
    torch.manual_seed(1)
    model = RRDBNet(
        num_features=4, num_blocks=1, growth_channels=2, scale=scale, unshuffle=unshuffle
    )
    image = torch.rand(1, 3, 20, 28)
    with torch.no_grad():
        whole = model(image)
    # One RRDB is 17 convs at input resolution (or at half of it after the unshuffle), plus the
    # four convs after upsampling: 20 input pixels of context cover the receptive field.
    tiled = tiled_forward(model.eval(), image, tile=12, overlap=20)
    assert tiled.shape == whole.shape
    assert torch.allclose(tiled, whole, atol=1e-5)
    # Without context the tile seams show: the test can tell the two apart.
    seamed = tiled_forward(model, image, tile=12, overlap=0)
    assert not torch.allclose(seamed, whole, atol=1e-4)


def test_odd_sides_with_unshuffle_are_padded_and_cropped_back() -> None:
    torch.manual_seed(2)
    model = RRDBNet(num_features=8, num_blocks=1, growth_channels=4, scale=2, unshuffle=2).eval()
    output = tiled_forward(model, torch.rand(1, 3, 15, 9), tile=8, overlap=4)
    assert output.shape == (1, 3, 30, 18)


def test_save_and_load_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = RRDBNet(num_features=8, num_blocks=1, growth_channels=4, scale=2, unshuffle=2).eval()
    model.save_pretrained(tmp_path / "drm")
    loaded = RRDBNet.from_pretrained(tmp_path / "drm").eval()
    image = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(image), loaded(image))
    with pytest.raises(ValueError, match="power of two"):
        RRDBNet(scale=3)
