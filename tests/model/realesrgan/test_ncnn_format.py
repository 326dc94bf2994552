"""The ncnn reader: names from the graph (not the file order), every byte and shape checked.

Small ncnn files are written here from seeded PyTorch modules by a writer that follows the format
description (not our reader), laid out like the published graphs; the published files themselves
are reordered and damaged to check what the reader refuses.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model.grounding.drm import RRDB, RRDBNet
from model.upscalers.realesrgan.ncnn import Graph, PostResize, check_against_module, convert
from model.upscalers.realesrgan.srvgg import SRVGGNetCompact

FP16_TAG = 0x01306B47


class NcnnWriter:
    """Writes ``.param`` lines and ``.bin`` bytes layer by layer (fp16 or fp32 conv storage)."""

    def __init__(self, *, fp16: bool = True) -> None:
        self.lines: list[str] = ["Input input 0 1 data"]
        self.data = bytearray()
        self.fp16 = fp16
        self.count = 0

    def layer(self, kind: str, inputs: list[str], params: str = "") -> str:
        self.count += 1
        output = f"b{self.count}"
        name = f"{kind}_{self.count}"
        line = f"{kind} {name} {len(inputs)} 1 {' '.join(inputs)} {output} {params}"
        self.lines.append(line.strip())
        return output

    def conv(self, x: str, conv: nn.Conv2d, *, leaky: float | None = None) -> str:
        weight = conv.weight.detach().numpy().ravel()
        out_channels = conv.weight.shape[0]
        params = f"0={out_channels} 1=3 4=1 5=1 6={weight.size}"
        if leaky is not None:
            params += f" 9=2 -23310=1,{leaky:e}"
        if self.fp16:
            self.data += struct.pack("<I", FP16_TAG) + weight.astype("<f2").tobytes()
            self.data += b"\0" * ((-len(self.data)) % 4)
        else:
            self.data += struct.pack("<I", 0) + weight.astype("<f4").tobytes()
        assert conv.bias is not None
        self.data += conv.bias.detach().numpy().astype("<f4").tobytes()
        return self.layer("Convolution", [x], params)

    def prelu(self, x: str, prelu: nn.PReLU) -> str:
        self.data += prelu.weight.detach().numpy().astype("<f4").tobytes()
        return self.layer("PReLU", [x], f"0={prelu.weight.numel()}")

    def write(self, folder: Path, stem: str) -> tuple[Path, Path]:
        blobs = 1 + self.count
        text = "\n".join(["7767517", f"{len(self.lines)} {blobs}", *self.lines]) + "\n"
        param, weights = folder / f"{stem}.param", folder / f"{stem}.bin"
        param.write_text(text)
        weights.write_bytes(bytes(self.data))
        return param, weights


def write_srvgg(net: SRVGGNetCompact, *, fp16: bool = True, resize: str = "") -> NcnnWriter:
    """The published animevideov3 layout: conv/PReLU chain, pixel shuffle, + nearest(input)."""
    writer = NcnnWriter(fp16=fp16)
    layers = list(net.body)
    x = "data"
    for module in layers:
        if isinstance(module, nn.Conv2d):
            x = writer.conv(x, module)
        else:
            assert isinstance(module, nn.PReLU)
            x = writer.prelu(x, module)
    up = net.scale_factor
    x = writer.layer("PixelShuffle", [x], f"0={up}")
    base = writer.layer("Interp", ["data"], f"0=1 1={up:e} 2={up:e}")
    x = writer.layer("BinaryOp", [x, base], "0=0")
    if resize:
        writer.layer("Interp", [x], resize)
    return writer


def write_rrdbnet(net: RRDBNet, *, fp16: bool = True) -> NcnnWriter:
    """Real-ESRGAN's exported RRDBNet graph: dense concats, 0.2-scaled residual Eltwise adds."""
    writer = NcnnWriter(fp16=fp16)
    first = writer.conv("data", net.conv_first)
    features = first
    for block in net.body:
        assert isinstance(block, RRDB)
        block_input = features
        for rdb in (block.rdb1, block.rdb2, block.rdb3):
            dense = [features]
            for index in range(1, 5):
                joined = dense[0] if len(dense) == 1 else writer.layer("Concat", dense)
                dense.append(writer.conv(joined, getattr(rdb, f"conv{index}"), leaky=0.2))
            fifth = writer.conv(writer.layer("Concat", dense), rdb.conv5)
            features = writer.layer("Eltwise", [fifth, dense[0]], "0=1 -23301=2,0.2,1.0")
        features = writer.layer("Eltwise", [features, block_input], "0=1 -23301=2,0.2,1.0")
    trunk = writer.conv(features, net.conv_body)
    features = writer.layer("BinaryOp", [first, trunk], "0=0")
    for index in range(net.num_upsamples):
        features = writer.layer("Interp", [features], "0=1 1=2.0 2=2.0")
        features = writer.conv(features, getattr(net, f"conv_up{index + 1}"), leaky=0.2)
    writer.conv(writer.conv(features, net.conv_hr, leaky=0.2), net.conv_last)
    return writer


def tiny_rrdbnet(seed: int = 0) -> RRDBNet:
    torch.manual_seed(seed)
    net: RRDBNet = RRDBNet(num_features=4, num_blocks=2, growth_channels=2, scale=4)
    net.eval()
    return net


def tiny_srvgg(seed: int = 0) -> SRVGGNetCompact:
    torch.manual_seed(seed)
    net: SRVGGNetCompact = SRVGGNetCompact(num_features=4, num_convs=3, upscale=4)
    net.eval()
    for module in net.body:
        if isinstance(module, nn.PReLU):
            module.weight.data.uniform_(0.0, 0.5)  # distinct slopes, so a mix-up shows
    return net


def assert_same_state(converted: dict[str, torch.Tensor], net: nn.Module, *, atol: float) -> None:
    expected = net.state_dict()
    assert converted.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.allclose(converted[key], value, atol=atol), key


@pytest.mark.parametrize("fp16", [True, False])
def test_rrdbnet_graph_converts_to_the_published_key_layout(tmp_path: Path, fp16: bool) -> None:
    net = tiny_rrdbnet()
    converted = convert(*write_rrdbnet(net, fp16=fp16).write(tmp_path, "rrdb"))
    assert converted.architecture == "rrdbnet" and converted.post_resize is None
    assert dict(converted.config) == dict(
        in_channels=3,
        out_channels=3,
        num_features=4,
        num_blocks=2,
        growth_channels=2,
        scale=4,
        unshuffle=1,
    )
    assert_same_state(dict(converted.state_dict), net, atol=1e-3 if fp16 else 0.0)
    image = torch.rand(1, 3, 9, 7)
    with torch.no_grad():
        assert torch.allclose(converted.build()(image), net(image), atol=1e-2 if fp16 else 1e-6)


@pytest.mark.parametrize("fp16", [True, False])
def test_srvgg_graph_converts_with_its_prelu_slopes(tmp_path: Path, fp16: bool) -> None:
    net = tiny_srvgg()
    converted = convert(*write_srvgg(net, fp16=fp16).write(tmp_path, "srvgg"))
    assert converted.architecture == "srvgg"
    assert dict(converted.config)["num_convs"] == 3
    assert_same_state(dict(converted.state_dict), net, atol=1e-3 if fp16 else 0.0)


def test_final_resize_is_read_from_the_graph(tmp_path: Path) -> None:
    writer = write_srvgg(tiny_srvgg(), resize="0=3 1=7.500000e-01 2=7.500000e-01")
    converted = convert(*writer.write(tmp_path, "x3"))
    assert converted.post_resize == PostResize(mode="bicubic", factor=0.75)


@pytest.mark.parametrize("stem", ["realesr-animevideov3-x4", "realesrgan-x4plus-anime"])
def test_published_layer_order_does_not_decide_the_names(
    tmp_path: Path, models_dir: Path, stem: str
) -> None:
    """A published file with its layers written in reverse (the .bin reordered to match)
    converts to the very same state dict."""
    lines = (models_dir / f"{stem}.param").read_text().splitlines()
    data = (models_dir / f"{stem}.bin").read_bytes()
    chunks, offset = [], 0
    for line in lines[2:]:
        tokens = line.split()
        params = dict(item.split("=", 1) for item in tokens[4 + int(tokens[2]) + int(tokens[3]) :])
        size = 0
        if tokens[0] == "Convolution":
            size = 4 + 2 * int(params["6"]) + 4 * int(params["0"])  # fp16 tag, weights, bias
        elif tokens[0] == "PReLU":
            size = 4 * int(params["0"])
        chunks.append((line, data[offset : offset + size]))
        offset += size
    assert offset == len(data)
    reversed_chunks = chunks[::-1]
    (tmp_path / "r.param").write_text("\n".join(lines[:2] + [c[0] for c in reversed_chunks]))
    (tmp_path / "r.bin").write_bytes(b"".join(c[1] for c in reversed_chunks))
    original = convert(models_dir / f"{stem}.param", models_dir / f"{stem}.bin")
    reordered = convert(tmp_path / "r.param", tmp_path / "r.bin")
    assert original.state_dict.keys() == reordered.state_dict.keys()
    assert all(
        torch.equal(original.state_dict[k], reordered.state_dict[k]) for k in original.state_dict
    )


def test_truncated_and_oversized_weights_are_refused(tmp_path: Path) -> None:
    param, weights = write_srvgg(tiny_srvgg()).write(tmp_path, "net")
    data = weights.read_bytes()
    weights.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        convert(param, weights)
    weights.write_bytes(data + b"\0" * 8)
    with pytest.raises(ValueError, match="8 bytes more"):
        convert(param, weights)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # conv1 of the first dense block loses its LeakyReLU
        (lambda t: t.replace(" 9=2 -23310=1,2.000000e-01", "", 1), "activation"),
        # a dense block's last conv disappears: the count is no longer 15 per block + 4 + ups
        (None, "convolutions"),
        # the upsampling is bilinear instead of nearest
        (lambda t: t.replace("0=1 1=2.0", "0=2 1=2.0", 1), "nearest"),
        # the dense blocks' residual scaling is not 0.2
        (lambda t: t.replace("-23301=2,0.2,1.0", "-23301=2,0.5,1.0", 1), "not 0.2"),
        # a layer type whose weights we could not place
        (lambda t: t.replace("BinaryOp", "InnerProduct", 1), "unsupported"),
        (lambda t: t.replace("7767517", "7767518", 1), "magic"),
    ],
)
def test_graphs_unlike_the_architecture_are_refused(
    tmp_path: Path, edit: Callable[[str], str] | None, message: str
) -> None:
    net = tiny_rrdbnet()
    writer = write_rrdbnet(net, fp16=False)
    if edit is None:
        # Drop the last conv (conv_last): its bytes go too, so only the count is wrong.
        writer.lines.pop()
        writer.data = writer.data[: -(4 + 4 * net.conv_last.weight.numel() + 4 * 3)]
    param, weights = writer.write(tmp_path, "rrdb")
    if edit is not None:
        param.write_text(edit(param.read_text()))
    with pytest.raises(ValueError, match=message):
        convert(param, weights)


def test_a_shape_unlike_the_module_is_refused() -> None:
    net = tiny_srvgg()
    state = dict(net.state_dict())
    state["body.2.weight"] = torch.zeros(4, 5, 3, 3)
    with pytest.raises(ValueError, match=r"body\.2\.weight has shape"):
        check_against_module(state, net, "test")
    del state["body.2.weight"]
    with pytest.raises(ValueError, match="missing"):
        check_against_module(state, net, "test")


def test_fp16_weights_keep_their_values(tmp_path: Path) -> None:
    net = tiny_srvgg()
    converted = convert(*write_srvgg(net, fp16=True).write(tmp_path, "net"))
    first = net.body[0]
    assert isinstance(first, nn.Conv2d)
    expected = first.weight.detach().numpy().astype(np.float16).astype(np.float32)
    assert np.array_equal(converted.state_dict["body.0.weight"].numpy(), expected)


def test_a_cyclic_graph_is_refused() -> None:
    lines = [
        "7767517",
        "3 3",
        "Input in 0 1 data",
        "Convolution a 1 1 c x",
        "Convolution b 1 1 x c",
    ]
    with pytest.raises(ValueError, match="cycle through layer"):
        Graph.parse("\n".join(lines)).conv_chain()
