"""Tiled super-resolution straight to a uint8 image, with a final resize applied per tile.

Real-ESRGAN's own inference (``RealESRGANer``, Wang et al. 2021) cuts large inputs into tiles with
a padding of context around each, runs the network per tile and keeps each tile's own region. We
do the same, and also apply the resize down to the requested scale (a Lanczos downscale of the x4
output, or the bicubic of the published animevideov3 x2 / x3 graphs) to each tile *with* its
context before cropping. The full-resolution float output of the network then never exists at
once: memory is one tile's activations plus the final uint8 image. Tile origins are whole input
pixels, so at the final scale they fall on whole pixels too and the per-tile resize equals the
whole-image one away from the context border.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.nn import functional

from model.grounding.drm import TileableNet

from .ncnn import PostResize

TileProgress = Callable[[int, int], None]
"""``(done, total)`` tiles; may raise to abort."""


@dataclass(frozen=True)
class TilePlan:
    """Where one tile lies in the (padded) input: its own region and its region with context."""

    top: int
    left: int
    bottom: int
    right: int
    in_top: int
    in_left: int
    in_bottom: int
    in_right: int


def plan_tiles(height: int, width: int, *, tile: int, overlap: int) -> list[TilePlan]:
    """Tiles of side ``tile`` covering ``height x width``, each with ``overlap`` of context."""
    if tile <= 0 or overlap < 0:
        raise ValueError(f"tile must be positive and overlap non-negative, got {tile}, {overlap}")
    plans = []
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            plans.append(
                TilePlan(
                    top,
                    left,
                    bottom,
                    right,
                    max(top - overlap, 0),
                    max(left - overlap, 0),
                    min(bottom + overlap, height),
                    min(right + overlap, width),
                )
            )
    return plans


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``(1, C, H, W)`` floats in [0, 1] -> ``(H, W, C)`` uint8: clamped, then rounded."""
    array = image[0].float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0)
    result: np.ndarray = array.cpu().numpy()
    return result


def finish(
    net_output: torch.Tensor, size: tuple[int, int], resize: PostResize | None
) -> np.ndarray:
    """The network's output brought to ``size = (height, width)`` as uint8.

    Graph resizes (nearest / bilinear / bicubic, as the published ncnn graphs do them) run on the
    floats; ``lanczos`` runs on the rounded uint8 image, as Real-ESRGAN's ``--outscale`` does.
    """
    height, width = size
    if tuple(net_output.shape[-2:]) == size:
        return to_uint8(net_output)
    if resize is None or resize.mode == "lanczos":
        image = Image.fromarray(to_uint8(net_output))
        return np.asarray(image.resize((width, height), Image.Resampling.LANCZOS))
    kwargs = {} if resize.mode == "nearest" else {"align_corners": False}
    resized = functional.interpolate(net_output.float(), size=size, mode=resize.mode, **kwargs)
    return to_uint8(resized)


@torch.no_grad()
def upscale_tiled(
    net: TileableNet,
    image: torch.Tensor,
    *,
    scale: int,
    tile: int,
    overlap: int,
    resize: PostResize | None = None,
    on_tile: TileProgress | None = None,
) -> np.ndarray:
    """``image`` ``(1, C, H, W)`` in [0, 1] upscaled ``scale`` times as ``(H*s, W*s, C)`` uint8.

    ``net`` magnifies by ``net.scale_factor >= scale``; a smaller ``scale`` is reached by
    ``resize`` on each tile. ``on_tile(done, total)`` is called before the first tile and after
    each; whatever it raises propagates unchanged.
    """
    if scale > net.scale_factor or scale < 1:
        raise ValueError(f"scale {scale} is outside 1..{net.scale_factor} for this network")
    multiple = net.input_multiple
    _, channels, height, width = image.shape
    padded = _pad_to_multiple(image, multiple)
    tile = max(multiple, tile - tile % multiple)
    overlap = overlap + (-overlap) % multiple
    plans = plan_tiles(padded.shape[-2], padded.shape[-1], tile=tile, overlap=overlap)
    output = np.zeros((padded.shape[-2] * scale, padded.shape[-1] * scale, channels), np.uint8)
    if on_tile is not None:
        on_tile(0, len(plans))
    for done, plan in enumerate(plans, start=1):
        crop = padded[:, :, plan.in_top : plan.in_bottom, plan.in_left : plan.in_right]
        context = ((plan.in_bottom - plan.in_top) * scale, (plan.in_right - plan.in_left) * scale)
        _paste(output, finish(net(crop.contiguous()), context, resize), plan, scale)
        if on_tile is not None:
            on_tile(done, len(plans))
    return output[: height * scale, : width * scale]


def _paste(output: np.ndarray, finished: np.ndarray, plan: TilePlan, scale: int) -> None:
    """Copy the tile's own region (its context cut away) from ``finished`` into ``output``."""
    top, left = (plan.top - plan.in_top) * scale, (plan.left - plan.in_left) * scale
    rows, cols = (plan.bottom - plan.top) * scale, (plan.right - plan.left) * scale
    output[plan.top * scale : plan.bottom * scale, plan.left * scale : plan.right * scale] = (
        finished[top : top + rows, left : left + cols]
    )


def _pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad the bottom and right so both sides are multiples of ``multiple``."""
    height, width = image.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if not (pad_h or pad_w):
        return image
    mode = "reflect" if min(height, width) > max(pad_h, pad_w) else "replicate"
    return functional.pad(image, (0, pad_w, 0, pad_h), mode=mode)
