# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""Tiling for large outputs (DESIGN 1.2 step 1 and 1.7; arXiv 2603.14112 processes 512² crops).

* **Latent tiles**: the diffusion runs on overlapping latent tiles (64² latent = 512² output for
  SD2). Each step, every tile's noise prediction is weighted by a Gaussian centred on the tile
  and the weighted predictions are averaged (MultiDiffusion-style blending), then one scheduler
  step updates the whole latent, so the noise is shared across tiles. Each tile gets its own
  conditioning, made once before the loop: the visual guidance of its crop and the boxes that
  intersect it, re-projected into tile coordinates (:func:`boxes_for_tile`).
* **VAE tiles**: encode and decode run tile by tile with feathered overlaps. Every GroupNorm uses
  statistics shared by all tiles -- whole-image statistics gathered in a first pass over the
  tiles -- instead of per-tile statistics, so tiles do not drift apart in tone [I] (see
  :func:`tiled_apply`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from torch import nn

from model.prompt import Box, GroundedPrompt


@dataclass(frozen=True)
class Tile:
    """A rectangle ``[top, top + height) x [left, left + width)`` of a grid (latent cells)."""

    top: int
    left: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    def scaled(self, factor: int) -> Tile:
        return Tile(
            self.top * factor, self.left * factor, self.height * factor, self.width * factor
        )


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with at least ``overlap``
    shared cells between neighbours, spread evenly, the last one flush with the end, each a
    multiple of ``align`` (except possibly the last)."""
    if length <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile={tile})")
    count = math.ceil((length - overlap) / (tile - overlap))
    starts = [(i * (length - tile) // (count - 1)) // align * align for i in range(count)]
    starts[-1] = length - tile
    return sorted(set(starts))


def tile_grid(height: int, width: int, tile: int, overlap: int, align: int = 1) -> list[Tile]:
    """Overlapping tiles covering a ``height x width`` grid, row by row."""
    tile_h, tile_w = min(tile, height), min(tile, width)
    return [
        Tile(top, left, tile_h, tile_w)
        for top in tile_starts(height, tile, overlap, align)
        for left in tile_starts(width, tile, overlap, align)
    ]


def gaussian_weights(height: int, width: int, *, sigma: float = 0.25) -> torch.Tensor:
    """Separable Gaussian centred on a ``height x width`` tile, ``sigma`` a fraction of a side."""

    def axis(n: int) -> torch.Tensor:
        x = (torch.arange(n, dtype=torch.float32) + 0.5) / n - 0.5
        return torch.exp(-(x**2) / (2 * sigma**2))

    return axis(height)[:, None] * axis(width)[None, :]


def feather_weights(height: int, width: int, ramp: int) -> torch.Tensor:
    """1 inside, rising linearly over ``ramp`` cells from each edge: blend weights for VAE tiles."""

    def axis(n: int) -> torch.Tensor:
        distance = torch.minimum(torch.arange(n), torch.arange(n).flip(0)).float()
        return ((distance + 0.5) / max(ramp, 1)).clamp(max=1.0)

    return axis(height)[:, None] * axis(width)[None, :]


def boxes_for_tile(prompt: GroundedPrompt, tile: Box) -> GroundedPrompt:
    """The tags whose boxes intersect ``tile``, with the intersections re-projected into tile
    coordinates.

    ``tile`` and the prompt's boxes are ``(x_lu, y_lu, x_rb, y_rb)`` normalised to the whole
    image; the result's boxes are normalised to the tile. A box that only touches the tile's edge
    is dropped; a degenerate (zero-area) box is kept when it lies in the tile. Caption and
    estimates are kept.
    """
    tx0, ty0, tx1, ty1 = tile
    if not (tx1 > tx0 and ty1 > ty0):
        raise ValueError(f"tile {tile} has no area")
    tags: list[str] = []
    boxes: list[Box] = []
    for tag, (x0, y0, x1, y1) in zip(prompt.tags, prompt.boxes, strict=True):
        ix0, iy0, ix1, iy1 = max(x0, tx0), max(y0, ty0), min(x1, tx1), min(y1, ty1)
        degenerate = x1 == x0 or y1 == y0
        if not (ix0 < ix1 and iy0 < iy1) and not (degenerate and ix0 <= ix1 and iy0 <= iy1):
            continue

        def to_tile(value: float, origin: float, size: float) -> float:
            return min(1.0, max(0.0, (value - origin) / size))

        tags.append(tag)
        boxes.append(
            (
                to_tile(ix0, tx0, tx1 - tx0),
                to_tile(iy0, ty0, ty1 - ty0),
                to_tile(ix1, tx0, tx1 - tx0),
                to_tile(iy1, ty0, ty1 - ty0),
            )
        )
    return GroundedPrompt(
        tags=tuple(tags),
        boxes=tuple(boxes),
        caption=prompt.caption,
        estimates=dict(prompt.estimates),
    )


# --- GroupNorm statistics shared across tiles
# -------------------------------------------------------

GroupStats = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Per GroupNorm module name: per-sample, per-group ``(mean, variance)``, each ``(B, groups)``."""


def owned_regions(tiles: list[Tile]) -> list[Tile]:
    """A partition of the grid among ``tiles``: each overlap is split in its middle.

    Statistics gathered over owned regions count every cell once, and never near a tile's edge.
    """
    tops = sorted({t.top for t in tiles})
    lefts = sorted({t.left for t in tiles})

    def span(starts: list[int], start: int, size: int) -> tuple[int, int]:
        i = starts.index(start)
        low = start if i == 0 else (start + starts[i - 1] + size) // 2
        high = start + size if i == len(starts) - 1 else (starts[i + 1] + start + size) // 2
        return low, high

    regions = []
    for t in tiles:
        (top, bottom), (left, right) = span(tops, t.top, t.height), span(lefts, t.left, t.width)
        regions.append(Tile(top, left, bottom - top, right - left))
    return regions


def _normalise_with(
    norm: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
) -> torch.Tensor:
    batch, channels = x.shape[:2]
    grouped = x.float().reshape(batch, norm.num_groups, -1)
    grouped = (grouped - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)
    y = grouped.reshape(x.shape).to(x.dtype)
    if norm.affine:
        shape = (1, channels) + (1,) * (x.ndim - 2)
        y = y * norm.weight.view(shape) + norm.bias.view(shape)
    return y


@contextmanager
def _patched_group_norms(
    net: nn.Module,
    make_forward: Callable[[str, nn.GroupNorm], Callable[[torch.Tensor], torch.Tensor]],
) -> Iterator[None]:
    norms = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.GroupNorm)]
    try:
        for name, norm in norms:
            norm.forward = make_forward(name, norm)  # type: ignore[method-assign,assignment]
        yield
    finally:
        for _, norm in norms:
            norm.__dict__.pop("forward", None)


@dataclass
class _Region:
    """The tile being run and the part of it it owns, in the network input's cells."""

    tile: Tile = Tile(0, 0, 1, 1)
    owned: Tile = Tile(0, 0, 1, 1)

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """The owned part of an activation ``x`` of this tile, at ``x``'s resolution.

        ``x`` is ``(B, C, h, w)``, or ``(B, C, h * w)`` as in a VAE attention's GroupNorm.
        """
        if x.ndim == 3:
            scale = math.sqrt(x.shape[-1] / (self.tile.height * self.tile.width))
            height = round(self.tile.height * scale)
            x = x.reshape(*x.shape[:2], height, x.shape[-1] // height)
        scale_h, scale_w = x.shape[-2] / self.tile.height, x.shape[-1] / self.tile.width
        top = round((self.owned.top - self.tile.top) * scale_h)
        left = round((self.owned.left - self.tile.left) * scale_w)
        bottom = top + max(1, round(self.owned.height * scale_h))
        right = left + max(1, round(self.owned.width * scale_w))
        return x[..., top:bottom, left:right]


@contextmanager
def _accumulating_group_norm_moments(
    net: nn.Module, moments: dict[str, tuple[torch.Tensor, torch.Tensor, int]], region: _Region
) -> Iterator[None]:
    """Run ``net`` with per-tile GroupNorm, summing each GroupNorm input over the owned region."""

    def make_forward(name: str, norm: nn.GroupNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            core = region.crop(x).double().reshape(x.shape[0], norm.num_groups, -1)
            zero = torch.zeros((), dtype=torch.float64, device=x.device)
            total, squares, count = moments.get(name, (zero, zero, 0))
            moments[name] = (
                total + core.sum(-1),
                squares + core.square().sum(-1),
                count + core.shape[-1],
            )
            return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)

        return forward

    with _patched_group_norms(net, make_forward):
        yield


@contextmanager
def shared_group_norm_stats(net: nn.Module, stats: GroupStats) -> Iterator[None]:
    """Run ``net`` with every GroupNorm normalising by the given statistics, not its input's."""

    def make_forward(name: str, norm: nn.GroupNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        mean, var = stats[name]

        def forward(x: torch.Tensor) -> torch.Tensor:
            return _normalise_with(norm, x, mean.to(x.device), var.to(x.device))

        return forward

    with _patched_group_norms(net, make_forward):
        yield


def tiled_apply(
    run: Callable[[torch.Tensor], torch.Tensor],
    net: nn.Module,
    x: torch.Tensor,
    *,
    tiles: list[Tile],
    factor: float,
    ramp: int,
) -> torch.Tensor:
    """``run(x)`` tile by tile, with the GroupNorms of ``net`` (the part of ``run`` that normalises)
    sharing statistics across tiles; outputs are blended with :func:`feather_weights`.

    ``tiles`` are in ``x``'s cells; output tile ``t`` is ``t`` scaled by ``factor`` (8 for a VAE
    decoder, 1/8 for an encoder); ``ramp`` is the blend ramp in output cells. Two passes over the
    tiles [I]: the first runs each tile with its own statistics while summing every GroupNorm
    input over the region the tile owns (:func:`owned_regions`), giving whole-image statistics;
    the second runs every tile with those shared statistics. Memory stays that of one tile.
    """
    moments: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
    region = _Region()
    with _accumulating_group_norm_moments(net, moments, region):
        for tile, owned in zip(tiles, owned_regions(tiles), strict=True):
            region.tile, region.owned = tile, owned
            run(x[..., tile.slices[0], tile.slices[1]])
    stats: GroupStats = {}
    for name, (total, squares, count) in moments.items():
        mean = total / count
        stats[name] = (mean.float(), (squares / count - mean.square()).clamp(min=0).float())

    def scaled(t: Tile) -> Tile:
        return Tile(
            round(t.top * factor),
            round(t.left * factor),
            round(t.height * factor),
            round(t.width * factor),
        )

    out: torch.Tensor | None = None
    total_weight: torch.Tensor | None = None
    with shared_group_norm_stats(net, stats):
        for tile in tiles:
            result = run(x[..., tile.slices[0], tile.slices[1]]).float()
            if out is None or total_weight is None:
                height, width = round(x.shape[-2] * factor), round(x.shape[-1] * factor)
                out = torch.zeros(*result.shape[:2], height, width, device=result.device)
                total_weight = torch.zeros(1, 1, height, width, device=result.device)
            target = scaled(tile)
            weight = feather_weights(target.height, target.width, ramp).to(result.device)
            out[..., target.slices[0], target.slices[1]] += result * weight
            total_weight[..., target.slices[0], target.slices[1]] += weight
    assert out is not None and total_weight is not None
    return (out / total_weight).to(x.dtype)


def vae_scale_factor(vae: AutoencoderKL) -> int:
    return int(2 ** (len(vae.config["block_out_channels"]) - 1))


def _encode(vae: AutoencoderKL, image: torch.Tensor) -> torch.Tensor:
    latent: torch.Tensor = vae.encode(image).latent_dist.mode()
    shift = float(vae.config.get("shift_factor") or 0.0)
    return (latent - shift) * float(vae.config["scaling_factor"])


def _decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    shift = vae.config.get("shift_factor") or 0.0
    image: torch.Tensor = vae.decode(latents / vae.config["scaling_factor"] + shift).sample
    return image


@torch.no_grad()
def tiled_vae_encode(
    vae: AutoencoderKL, image: torch.Tensor, *, tile: int = 64, overlap: int = 8
) -> torch.Tensor:
    """Scaled VAE latent (mode of the posterior) of ``image`` in ``[-1, 1]``, tiled beyond ``tile``
    latent cells.

    ``image``'s sides must be multiples of the VAE's scale factor; ``tile`` and ``overlap`` are
    in latent cells.
    """
    factor = vae_scale_factor(vae)
    height, width = image.shape[-2] // factor, image.shape[-1] // factor
    if height <= tile and width <= tile:
        return _encode(vae, image)
    tiles = [t.scaled(factor) for t in tile_grid(height, width, tile, overlap)]
    return tiled_apply(
        lambda x: _encode(vae, x), vae.encoder, image, tiles=tiles, factor=1 / factor, ramp=overlap
    )


@torch.no_grad()
def tiled_vae_decode(
    vae: AutoencoderKL, latents: torch.Tensor, *, tile: int = 64, overlap: int = 8
) -> torch.Tensor:
    """Image in ``[-1, 1]`` decoded from scaled ``latents``, tiled beyond ``tile`` latent cells."""
    height, width = latents.shape[-2:]
    if height <= tile and width <= tile:
        return _decode(vae, latents)
    factor = vae_scale_factor(vae)
    tiles = tile_grid(height, width, tile, overlap)
    return tiled_apply(
        lambda z: _decode(vae, z),
        vae.decoder,
        latents,
        tiles=tiles,
        factor=factor,
        ramp=overlap * factor,
    )
