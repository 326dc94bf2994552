"""The degradation-removal model (DRM): an RRDBNet that loads published BSRNet / RealESRNet weights.

Paper: "DRM(LR) -> clean estimate; grounding runs on the clean estimate" (arXiv 2603.14112, Fig. 2,
inference-only path; DESIGN 1.2 step 2). Architecture: ESRGAN's Residual-in-Residual Dense Block
network (Wang et al. 2018, Sec. 3.1) with residual scaling 0.2, as used by BSRGAN and Real-ESRGAN.

Key layouts accepted by :meth:`RRDBNet.from_published_checkpoint`:

- Real-ESRGAN / BasicSR (``RealESRNet_x4plus.pth``, ``RealESRNet_x2plus.pth``): ``conv_first``,
  ``body.N.rdb1.conv1`` ... ``conv_body``, ``conv_up1``, ``conv_up2``, ``conv_hr``, ``conv_last``;
  the x2 model puts a pixel-unshuffle by 2 in front (``conv_first`` sees 12 channels);
- ESRGAN / KAIR (``BSRNet.pth``): ``RRDB_trunk.N.RDB1.conv1`` ... ``trunk_conv``, ``upconv1``,
  ``upconv2``, ``HRconv``; renamed on load. KAIR's x2 variant has only ``upconv1``.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Protocol

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional

from .modules import frozen

logger = logging.getLogger(__name__)

RESIDUAL_SCALE = 0.2

_LEGACY_RENAMES = (
    (r"^RRDB_trunk\.", "body."),
    (r"\.RDB(\d)\.", r".rdb\1."),
    (r"^trunk_conv\.", "conv_body."),
    (r"^upconv1\.", "conv_up1."),
    (r"^upconv2\.", "conv_up2."),
    (r"^HRconv\.", "conv_hr."),
)


class TileableNet(Protocol):
    """What tiled inference needs of a super-resolution network (RRDBNet, SRVGGNetCompact)."""

    scale_factor: int
    """Output side / input side."""
    out_channels: int

    @property
    def input_multiple(self) -> int:
        """Input sides must be multiples of this."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs; the output is scaled by 0.2 and added back."""

    def __init__(self, num_features: int, growth_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_features, growth_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(num_features + growth_channels, growth_channels, 3, padding=1)
        self.conv3 = nn.Conv2d(num_features + 2 * growth_channels, growth_channels, 3, padding=1)
        self.conv4 = nn.Conv2d(num_features + 3 * growth_channels, growth_channels, 3, padding=1)
        self.conv5 = nn.Conv2d(num_features + 4 * growth_channels, num_features, 3, padding=1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5: torch.Tensor = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Three residual dense blocks inside one more scaled residual connection."""

    def __init__(self, num_features: int, growth_channels: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_features, growth_channels)
        self.rdb2 = ResidualDenseBlock(num_features, growth_channels)
        self.rdb3 = ResidualDenseBlock(num_features, growth_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.rdb3(self.rdb2(self.rdb1(x)))
        return out * RESIDUAL_SCALE + x


class RRDBNet(ModelMixin, ConfigMixin):  # type: ignore[misc]
    """ESRGAN generator: ``x -> conv_first -> RRDB x num_blocks -> conv_body (+skip) -> upsample``.

    ``scale`` is the overall magnification. ``unshuffle`` is the pixel-unshuffle factor in front
    (Real-ESRGAN: 2 for its x2 model, 4 for x1); the trunk then upsamples by ``scale * unshuffle``
    with nearest-neighbour x2 steps, each followed by a conv (``conv_up1``, ``conv_up2``).
    """

    @register_to_config  # type: ignore[untyped-decorator]
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        num_features: int = 64,
        num_blocks: int = 23,
        growth_channels: int = 32,
        scale: int = 4,
        unshuffle: int = 1,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        upsample = scale * unshuffle
        if upsample < 1 or upsample & (upsample - 1):
            raise ValueError(f"scale * unshuffle must be a power of two, got {scale} * {unshuffle}")
        self.num_upsamples = int(math.log2(upsample))
        # Plain ints beside the (dict-typed) registered config, for the forward pass and tiling.
        self.scale_factor = scale
        self.unshuffle_factor = unshuffle
        self.out_channels = out_channels
        self.conv_first = nn.Conv2d(in_channels * unshuffle**2, num_features, 3, padding=1)
        self.body = nn.Sequential(*[RRDB(num_features, growth_channels) for _ in range(num_blocks)])
        self.conv_body = nn.Conv2d(num_features, num_features, 3, padding=1)
        for index in range(self.num_upsamples):
            # Registered under the published names (conv_up1, conv_up2): state dicts load as is.
            conv = nn.Conv2d(num_features, num_features, 3, padding=1)
            self.add_module(f"conv_up{index + 1}", conv)
        self.conv_hr = nn.Conv2d(num_features, num_features, 3, padding=1)
        self.conv_last = nn.Conv2d(num_features, out_channels, 3, padding=1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    @property
    def input_multiple(self) -> int:
        """Input sides must be multiples of this (the pixel-unshuffle factor)."""
        return self.unshuffle_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle_factor > 1:
            x = functional.pixel_unshuffle(x, self.unshuffle_factor)
        features = self.conv_first(x)
        features = features + self.conv_body(self.body(features))
        for index in range(self.num_upsamples):
            conv = getattr(self, f"conv_up{index + 1}")
            features = functional.interpolate(features, scale_factor=2.0, mode="nearest")
            features = self.lrelu(conv(features))
        return torch.as_tensor(self.conv_last(self.lrelu(self.conv_hr(features))))

    @classmethod
    def from_published_checkpoint(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> RRDBNet:
        """Build and load the network a BSRNet / RealESRNet ``.pth`` or ``.safetensors`` holds.

        Sizes (features, blocks, growth channels, scale, unshuffle) are read off the tensor shapes,
        so the x4, x2 and x1 variants need no flags.
        """
        state = load_published_state_dict(path)
        config = infer_rrdbnet_config(state)
        logger.info("DRM checkpoint %s: RRDBNet %s", Path(path).name, config)
        model: RRDBNet = cls(**config)
        model.load_state_dict(state, strict=True)
        return frozen(model, device, dtype)


def load_published_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return its weights in the BasicSR key layout."""
    path = Path(path)
    if path.suffix == ".safetensors":
        raw: dict[str, object] = dict(load_file(str(path)))
    else:
        # weights_only: published .pth files hold plain tensors; never unpickle arbitrary objects.
        raw = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("params_ema", "params", "state_dict"):
        inner = raw.get(wrapper)
        if isinstance(inner, dict):
            raw = inner
            break
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = key.removeprefix("module.")
        for pattern, replacement in _LEGACY_RENAMES:
            name = re.sub(pattern, replacement, name)
        state[name] = value
    return state


def infer_rrdbnet_config(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """RRDBNet constructor arguments from the shapes of a BasicSR-layout state dict."""
    first = state["conv_first.weight"]
    last = state["conv_last.weight"]
    out_channels = int(last.shape[0])
    in_total = int(first.shape[1])
    unshuffle = round(math.sqrt(in_total / out_channels))
    num_upsamples = len({key.split(".")[0] for key in state if key.startswith("conv_up")})
    blocks = {int(key.split(".")[1]) for key in state if key.startswith("body.")}
    return {
        "in_channels": in_total // unshuffle**2,
        "out_channels": out_channels,
        "num_features": int(first.shape[0]),
        "num_blocks": len(blocks),
        "growth_channels": int(state["body.0.rdb1.conv1.weight"].shape[0]),
        "scale": 2**num_upsamples // unshuffle,
        "unshuffle": unshuffle,
    }


@torch.no_grad()
def tiled_forward(
    model: TileableNet, image: torch.Tensor, *, tile: int = 256, overlap: int = 16
) -> torch.Tensor:
    """Run ``model`` on ``(B, C, H, W)`` in tiles of ``tile`` input pixels with ``overlap`` context.

    Each tile is run with up to ``overlap`` extra input pixels on every side and only its own region
    of the output is kept, so memory is bounded by the tile size. With ``overlap`` at least the
    network's receptive radius the result equals one untiled pass; it always does when the image
    fits in one tile. Sides that are not multiples of the unshuffle factor are reflect-padded.
    """
    if tile <= 0 or overlap < 0:
        raise ValueError(f"tile must be positive and overlap non-negative, got {tile}, {overlap}")
    multiple = model.input_multiple
    scale = model.scale_factor
    _, _, height, width = image.shape
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h or pad_w:
        mode = "reflect" if min(height, width) > max(pad_h, pad_w) else "replicate"
        image = functional.pad(image, (0, pad_w, 0, pad_h), mode=mode)
    tile = max(multiple, tile - tile % multiple)
    overlap = overlap + (-overlap) % multiple
    padded_h, padded_w = image.shape[-2:]
    output: torch.Tensor
    if padded_h <= tile and padded_w <= tile:
        output = model(image)
    else:
        output = image.new_zeros(
            image.shape[0], model.out_channels, padded_h * scale, padded_w * scale
        )
        for top in range(0, padded_h, tile):
            for left in range(0, padded_w, tile):
                bottom, right = min(top + tile, padded_h), min(left + tile, padded_w)
                in_top, in_left = max(top - overlap, 0), max(left - overlap, 0)
                in_bottom, in_right = (
                    min(bottom + overlap, padded_h),
                    min(right + overlap, padded_w),
                )
                result: torch.Tensor = model(image[:, :, in_top:in_bottom, in_left:in_right])
                crop_top, crop_left = (top - in_top) * scale, (left - in_left) * scale
                output[:, :, top * scale : bottom * scale, left * scale : right * scale] = result[
                    :,
                    :,
                    crop_top : crop_top + (bottom - top) * scale,
                    crop_left : crop_left + (right - left) * scale,
                ]
    return output[:, :, : height * scale, : width * scale]
