"""SRVGGNetCompact: the small, VGG-style network of Real-ESRGAN's compact models.

Real-ESRGAN (Wang et al. 2021) ships it as ``realesr-animevideov3`` and ``realesr-general-x4v3``:
a 3x3 conv and activation at input resolution, ``num_convs`` more conv + activation pairs, a last
conv to ``out_channels * upscale**2`` channels, a pixel shuffle, and the input upsampled by
nearest neighbour added on top, so the network only learns the residual over a nearest upscale.
Everything runs at input resolution, which is what makes it ~30x cheaper than RRDBNet.

The module keeps the published key layout (``body.0`` the first conv, ``body.1`` its PReLU,
..., ``body.{2 * num_convs + 2}`` the last conv), so ``realesr-animevideov3.pth`` (``params``)
loads as is.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn import functional

from model.grounding.drm import load_published_state_dict
from model.grounding.modules import frozen

logger = logging.getLogger(__name__)

Activation = Literal["prelu", "relu", "leakyrelu"]
ACTIVATIONS: tuple[Activation, ...] = ("prelu", "relu", "leakyrelu")
COMPACT_LEAKY_SLOPE = 0.1
"""The slope of the published code's ``leakyrelu`` choice."""


def _activation(kind: str, num_features: int) -> nn.Module:
    if kind == "prelu":
        return nn.PReLU(num_parameters=num_features)
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "leakyrelu":
        return nn.LeakyReLU(COMPACT_LEAKY_SLOPE, inplace=True)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {kind!r}")


class SRVGGNetCompact(ModelMixin, ConfigMixin):  # type: ignore[misc]
    """``x -> (conv, act) x (num_convs + 1) -> conv -> pixel shuffle`` plus ``nearest(x)``."""

    @register_to_config  # type: ignore[untyped-decorator]
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        num_features: int = 64,
        num_convs: int = 16,
        upscale: int = 4,
        activation: str = "prelu",
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if in_channels != out_channels:
            raise ValueError("the nearest-upsampled input is added to the output: in == out")
        if upscale < 1 or num_convs < 0:
            raise ValueError(f"upscale must be >= 1 and num_convs >= 0, got {upscale}, {num_convs}")
        # Plain ints beside the registered config, for the forward pass and tiling.
        self.scale_factor = upscale
        self.out_channels = out_channels
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, num_features, 3, padding=1),
            _activation(activation, num_features),
        ]
        for _ in range(num_convs):
            layers.append(nn.Conv2d(num_features, num_features, 3, padding=1))
            layers.append(_activation(activation, num_features))
        layers.append(nn.Conv2d(num_features, out_channels * upscale**2, 3, padding=1))
        self.body = nn.Sequential(*layers)

    @property
    def input_multiple(self) -> int:
        """Any input side works (no pixel-unshuffle in front)."""
        return 1

    @property
    def receptive_radius(self) -> int:
        """Input pixels of context one output pixel sees: one per 3x3 conv."""
        return sum(isinstance(layer, nn.Conv2d) for layer in self.body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = functional.pixel_shuffle(self.body(x), self.scale_factor)
        base = functional.interpolate(x, scale_factor=float(self.scale_factor), mode="nearest")
        return torch.as_tensor(out + base)

    @classmethod
    def from_published_checkpoint(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        activation: str | None = None,
    ) -> SRVGGNetCompact:
        """Build and load the network a ``.pth`` (``params`` / ``params_ema``) or
        ``.safetensors`` holds; sizes are read off the tensor shapes.

        A PReLU checkpoint (every published one) says its activation itself; for weight-free
        activations pass ``activation``.
        """
        state = load_published_state_dict(path)
        config = infer_srvgg_config(state, activation=activation)
        logger.info("checkpoint %s: SRVGGNetCompact %s", Path(path).name, config)
        model: SRVGGNetCompact = cls(**config)
        model.load_state_dict(state, strict=True)
        return frozen(model, device, dtype)


def infer_srvgg_config(
    state: dict[str, torch.Tensor], *, activation: str | None = None
) -> dict[str, int | str]:
    """SRVGGNetCompact constructor arguments from the shapes of a published-layout state dict."""
    convs = sorted(
        int(key.split(".")[1])
        for key in state
        if key.startswith("body.") and key.endswith(".weight") and state[key].dim() == 4
    )
    if not convs or convs[0] != 0:
        raise ValueError("not an SRVGGNetCompact state dict: no body.0 convolution")
    has_prelu = "body.1.weight" in state
    if activation is None:
        if not has_prelu:
            raise ValueError("no PReLU weights: pass the activation ('relu' or 'leakyrelu')")
        activation = "prelu"
    elif (activation == "prelu") != has_prelu:
        raise ValueError(f"activation {activation!r} does not match the checkpoint's weights")
    first, last = state["body.0.weight"], state[f"body.{convs[-1]}.weight"]
    in_channels = int(first.shape[1])
    upscale = math.isqrt(int(last.shape[0]) // in_channels)
    if upscale**2 * in_channels != last.shape[0]:
        raise ValueError(f"last conv has {last.shape[0]} outputs, not {in_channels} x upscale^2")
    return {
        "in_channels": in_channels,
        "out_channels": in_channels,
        "num_features": int(first.shape[0]),
        "num_convs": len(convs) - 2,
        "upscale": upscale,
        "activation": activation,
    }
