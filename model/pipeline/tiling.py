"""Tiling for large outputs (DESIGN 1.2 step 1 and 1.7; arXiv 2603.14112 processes 512² crops).

* **Latent tiles**: the diffusion runs on overlapping latent tiles (64² latent = 512² output for
  SD2). Each step, every tile's noise prediction is weighted by a Gaussian centred on the tile
  and the weighted predictions are averaged (MultiDiffusion-style blending), then one scheduler
  step updates the whole latent, so the noise is shared across tiles. Each tile gets its own
  conditioning, made once before the loop: the visual guidance of its crop and the boxes that
  intersect it, re-projected into tile coordinates (:func:`boxes_for_tile`).
* **VAE tiles**: encode and decode run over tiles with feathered overlaps, each tile once, tiles
  of one shape in batches. The input may be read region by region (:class:`Regions`: an image
  computed on demand is never whole) and the output is handed on in bands of finished rows
  (:data:`Emit`), so a pass holds one batch of tiles plus the rows later tiles still blend into.
  Every GroupNorm uses statistics shared by all tiles instead of per-tile statistics, so tiles
  do not drift apart in tone [I]: by default those of one untiled run on a mosaic of
  full-resolution blocks spread over the whole input (one tile of work,
  :func:`mosaic_group_norm_stats`); the earlier first pass over every tile
  (:func:`tile_pass_group_norm_stats`) remains as ``statistics="two-pass"``. The shared
  normalisation is a per-channel affine map in the activation's dtype and memory layout
  (:class:`SharedNorm`), with no Python on values, so a compiled VAE traces it whole.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from torch import nn

from model.pipeline.prompt import Box, GroundedPrompt


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

STATISTICS = ("mosaic", "two-pass")
"""Where a tiled VAE pass gets its shared GroupNorm statistics: ``mosaic``, one untiled run on a
mosaic of full-resolution blocks of the input (:func:`mosaic_group_norm_stats`; the work of one
tile at the pipeline's tile sizes); ``two-pass``, a first pass over every tile summing each
GroupNorm input over the region the tile owns (:func:`tile_pass_group_norm_stats`; twice the
work)."""

MOSAIC_BLOCKS = 4
"""Blocks per side of the statistics mosaic: 16 blocks spread over the input."""

MIN_MOSAIC_BLOCK = 8
"""Smallest block side in latent cells. The decoder's reach is a number of latent cells whatever
the tile size, and a block much smaller than that is mostly border; so a block is a quarter tile
(16 cells of the pipeline's 64-cell tiles: the mosaic is one tile) but never below this."""

UNTILED_TILES = 4
"""A latent with no more cells than this many tiles is run untiled: exact, cheaper than its
overlapping tiles plus a statistics pass, in the memory of a batch of four tiles."""

VAE_TILE_BATCH = {"cuda": 4}
"""Tiles per VAE forward by device type, when the caller does not say; 1 elsewhere. On a GPU a
batch keeps the low-resolution layers of a 512² tile busy; memory grows linearly (four 512² SD
decoder tiles in bf16: a few GiB by activation sizes, not measured on a GPU yet). On a CPU a
batch is slower (bench/RESULTS.md)."""


def default_vae_batch(device: torch.device) -> int:
    return VAE_TILE_BATCH.get(device.type, 1)


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


def tile_batches(tiles: list[Tile], size: int) -> list[list[Tile]]:
    """``tiles`` grouped by shape, in order, in batches of at most ``size``."""
    groups: dict[tuple[int, int], list[Tile]] = {}
    for t in tiles:
        groups.setdefault((t.height, t.width), []).append(t)
    step = max(1, size)
    return [group[i : i + step] for group in groups.values() for i in range(0, len(group), step)]


# --- Inputs read region by region, outputs handed on band by band
# -------------------------------------------------------


@dataclass(frozen=True)
class Regions:
    """A ``(B, C, height, width)`` input read one region at a time: ``read(rows, cols)`` is its
    ``[..., rows, cols]``. A tiled pass reads only its tiles and its statistics' blocks, so an
    input computed on demand (the pipeline's upsampled image) never exists at full size."""

    read: Callable[[slice, slice], torch.Tensor]
    height: int
    width: int
    device: torch.device

    @classmethod
    def of(cls, x: torch.Tensor) -> Regions:
        return cls(lambda rows, cols: x[..., rows, cols], x.shape[-2], x.shape[-1], x.device)

    def tile(self, t: Tile) -> torch.Tensor:
        return self.read(*t.slices)

    def whole(self) -> torch.Tensor:
        return self.read(slice(0, self.height), slice(0, self.width))


Source = torch.Tensor | Regions
"""A tiled pass's input: whole, or :class:`Regions`."""


def as_regions(x: Source) -> Regions:
    return x if isinstance(x, Regions) else Regions.of(x)


Emit = Callable[[int, torch.Tensor], None]
"""Receives a tiled pass's output as ``(top, rows)``: full-width bands of finished (fully blended)
rows, consecutive, top to bottom."""


def collect(stream: Callable[[Emit], None]) -> torch.Tensor:
    """The whole output of ``stream(emit)``: its bands concatenated."""
    bands: list[torch.Tensor] = []
    stream(lambda top, rows: bands.append(rows))
    return bands[0] if len(bands) == 1 else torch.cat(bands, -2)


class _BandBlender:
    """Feathered blending of tile outputs into an accumulator of only the rows that tiles still to
    come add to; rows no later tile touches are divided by their weight and handed on.

    Per pixel it sums the same terms in the same order as one whole-image accumulator, so the
    result is the same to the bit; in raster order it holds about one row of tiles."""

    def __init__(self, width: int, dtype: torch.dtype, emit: Emit) -> None:
        self.width, self.dtype, self.emit = width, dtype, emit
        self.top = 0
        """Output row of the accumulator's first row."""
        self.sums: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None

    def add(self, target: Tile, result: torch.Tensor, weight: torch.Tensor) -> None:
        """``result`` (float32) weighted by ``weight`` at ``target`` (output cells)."""
        self._extend(target.top + target.height, result)
        assert self.sums is not None and self.weights is not None
        rows = slice(target.top - self.top, target.top + target.height - self.top)
        cols = target.slices[1]
        self.sums[..., rows, cols] += result * weight
        self.weights[..., rows, cols] += weight

    def _extend(self, bottom: int, like: torch.Tensor) -> None:
        held = 0 if self.sums is None else self.sums.shape[-2]
        grow = bottom - self.top - held
        if grow <= 0:
            return
        sums = torch.zeros(*like.shape[:2], grow, self.width, device=like.device)
        weights = torch.zeros(1, 1, grow, self.width, device=like.device)
        if self.sums is not None and self.weights is not None:
            sums, weights = torch.cat([self.sums, sums], -2), torch.cat([self.weights, weights], -2)
        self.sums, self.weights = sums, weights

    def flush(self, until: int) -> None:
        """Hand on the held rows above output row ``until`` (no tile left adds to them)."""
        if self.sums is None or self.weights is None:
            return
        count = min(until - self.top, self.sums.shape[-2])
        if count <= 0:
            return
        weights = self.weights[..., :count, :]
        # Divided in place (the rows are done): no second buffer of a band as wide as the image.
        band = self.sums[..., :count, :].div_(weights).to(self.dtype)
        # Copies, so that the handed-on rows' storage is freed with the band, not at the next
        # extension.
        self.sums = self.sums[..., count:, :].clone()
        self.weights = self.weights[..., count:, :].clone()
        del weights
        top, self.top = self.top, self.top + count
        self.emit(top, band)


def _group_norms(net: nn.Module) -> list[tuple[str, nn.GroupNorm]]:
    return [(name, m) for name, m in net.named_modules() if isinstance(m, nn.GroupNorm)]


@contextmanager
def _patched_group_norms(
    net: nn.Module,
    make_forward: Callable[[str, nn.GroupNorm], Callable[[torch.Tensor], torch.Tensor]],
) -> Iterator[None]:
    norms = _group_norms(net)
    try:
        for name, norm in norms:
            norm.forward = make_forward(name, norm)  # type: ignore[method-assign,assignment]
        yield
    finally:
        for _, norm in norms:
            norm.__dict__.pop("forward", None)


def _plain_group_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


@dataclass
class SharedNorm:
    """A GroupNorm that normalises by given statistics instead of its input's.

    The statistics are per sample and channel (each group's moments repeated over its channels),
    in float32, made once per image, so that the per-tile work is one elementwise map in the
    activation's own dtype and memory layout, free of Python branching on values (compilable).
    """

    mean: torch.Tensor
    """``(B, C)``."""
    var: torch.Tensor
    """``(B, C)``."""
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float

    @classmethod
    def of(cls, norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> SharedNorm:
        """From per-group ``(B, groups)`` moments."""
        per_group = norm.num_channels // norm.num_groups

        def channels(t: torch.Tensor) -> torch.Tensor:
            return t.float().repeat_interleave(per_group, dim=1)

        return cls(
            mean=channels(mean),
            var=channels(var),
            weight=norm.weight.float() if norm.affine else None,
            bias=norm.bias.float() if norm.affine else None,
            eps=norm.eps,
        )

    def _tensors(self) -> list[torch.Tensor | None]:
        return [self.mean, self.var, self.weight, self.bias]

    def load(self, other: SharedNorm) -> bool:
        """Take ``other``'s values in place when every tensor has the same shape, dtype and
        device (then a compiled network that captured these tensors needs no recompilation);
        ``False`` (nothing changed) otherwise."""
        pairs = list(zip(self._tensors(), other._tensors(), strict=True))
        same = self.eps == other.eps and all(
            (a is None and b is None)
            or (
                a is not None
                and b is not None
                and (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)
            )
            for a, b in pairs
        )
        if same:
            for a, b in pairs:
                if a is not None and b is not None:
                    a.copy_(b)
        return same

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean.shape[0] == 1:
            # One image: every tile of a batch normalises with the same per-channel statistics,
            # which is exactly inference-mode batch norm -- one fused kernel that reads half
            # precision with float32 statistics (computing in float32, writing x's dtype),
            # keeps channels-last, and that compilers lower to a fused elementwise op.
            return F.batch_norm(
                x, self.mean[0], self.var[0], self.weight, self.bias, training=False, eps=self.eps
            )
        # Several images per tile batch (not the pipeline's case): per-sample scale and shift,
        # repeated for each tile, applied in float32 and cast back.
        scale = torch.rsqrt(self.var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        repeats = x.shape[0] // scale.shape[0]
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
        scale, shift = scale.repeat(repeats, 1).view(shape), shift.repeat(repeats, 1).view(shape)
        return torch.addcmul(shift, x, scale).to(x.dtype)


# One SharedNorm per GroupNorm, reused from image to image with new values, so that a compiled
# VAE (whose guards hold these objects and tensors) does not recompile for every image.
_SHARED_NORMS: weakref.WeakKeyDictionary[nn.GroupNorm, SharedNorm] = weakref.WeakKeyDictionary()


def _shared_norm(norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> SharedNorm:
    fresh = SharedNorm.of(norm, mean, var)
    held = _SHARED_NORMS.get(norm)
    if held is not None and held.load(fresh):
        return held
    _SHARED_NORMS[norm] = fresh
    return fresh


@contextmanager
def shared_group_norm_stats(net: nn.Module, stats: GroupStats) -> Iterator[None]:
    """Run ``net`` with every GroupNorm normalising by the given statistics, not its input's.

    ``stats`` are per sample of one image; a batch of ``k`` tiles of that image (``k * B``
    samples, tile-major) uses them for every tile."""

    def make_forward(name: str, norm: nn.GroupNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        mean, var = stats[name]
        return _shared_norm(norm, mean, var)

    with _patched_group_norms(net, make_forward):
        yield


@contextmanager
def recorded_group_norm_stats(net: nn.Module, stats: GroupStats) -> Iterator[None]:
    """Run ``net`` unchanged, recording every GroupNorm input's per-group moments in ``stats``.

    Moments are float32 (two-pass ``var_mean``): half-precision sums over a whole activation
    lose digits. Each GroupNorm is expected to run once per forward (true of the VAE)."""

    def make_forward(name: str, norm: nn.GroupNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            grouped = x.reshape(x.shape[0], norm.num_groups, -1).float()
            var, mean = torch.var_mean(grouped, dim=-1, correction=0)
            stats[name] = (mean, var)
            # Normalised by the moments just taken: GroupNorm itself, without a second reduction.
            return SharedNorm.of(norm, mean, var)(x)

        return forward

    with _patched_group_norms(net, make_forward):
        yield


def mosaic(x: Source, *, side: int, block: int, multiple: int = 1) -> torch.Tensor:
    """A thumbnail of ``x`` about ``side`` cells square, made of ``block``-sized full-resolution
    blocks of ``x`` spread evenly over it (``side // block`` per side, the last flush with the
    end, overlapping where ``x`` is short); ``x`` itself (whole) when it has no more cells than
    that. Block starts and sides are multiples of ``multiple`` (a VAE encoder's pixels)."""
    source = as_regions(x)
    height, width = source.height, source.width
    if height * width <= side * side:
        return x if isinstance(x, torch.Tensor) else source.whole()
    count = max(2, side // block)
    block_h, block_w = min(block, height), min(block, width)

    def starts(length: int, size: int) -> list[int]:
        last = length - size
        return [i * last // (count - 1) // multiple * multiple for i in range(count)]

    lefts = starts(width, block_w)
    rows = [
        torch.cat(
            [source.read(slice(top, top + block_h), slice(left, left + block_w)) for left in lefts],
            -1,
        )
        for top in starts(height, block_h)
    ]
    return torch.cat(rows, -2)


def mosaic_group_norm_stats(
    run: Callable[[torch.Tensor], torch.Tensor],
    net: nn.Module,
    x: Source,
    *,
    side: int,
    block: int,
    multiple: int = 1,
) -> GroupStats:
    """GroupNorm statistics of ``net`` from one untiled ``run`` on a :func:`mosaic` of ``x``.

    The blocks keep ``x``'s full resolution, so every activation keeps its fine detail and its
    variance (an area-downsampled ``x`` loses exactly that: on noise-like latents its variances
    come out several times too small and the decode blows up); spread over the whole of ``x``,
    they sample its content everywhere. One run normalised by its own statistics keeps every
    layer's statistics consistent with the layers before it, which a per-tile first pass does not
    (each tile there sees different earlier normalisations). Costs ``side²`` cells of work.
    """
    stats: GroupStats = {}
    with recorded_group_norm_stats(net, stats):
        run(mosaic(x, side=side, block=block, multiple=multiple))
    return stats


def _crop_owned(x: torch.Tensor, tile: Tile, owned: Tile) -> torch.Tensor:
    """The part of activation ``x`` of ``tile`` that ``owned`` covers, at ``x``'s resolution.

    ``x`` is ``(B, C, h, w)``, or ``(B, C, h * w)`` as in a VAE attention's GroupNorm.
    """
    if x.ndim == 3:
        scale = math.sqrt(x.shape[-1] / (tile.height * tile.width))
        height = round(tile.height * scale)
        x = x.reshape(*x.shape[:2], height, x.shape[-1] // height)
    scale_h, scale_w = x.shape[-2] / tile.height, x.shape[-1] / tile.width
    top = round((owned.top - tile.top) * scale_h)
    left = round((owned.left - tile.left) * scale_w)
    bottom = top + max(1, round(owned.height * scale_h))
    right = left + max(1, round(owned.width * scale_w))
    return x[..., top:bottom, left:right]


def tile_pass_group_norm_stats(
    run: Callable[[torch.Tensor], torch.Tensor],
    net: nn.Module,
    x: Source,
    *,
    tiles: list[Tile],
    batch_size: int = 1,
) -> GroupStats:
    """Whole-image GroupNorm statistics of ``net`` from a first pass over every tile [I].

    Each tile runs with its own statistics while every GroupNorm input is summed (float64) over
    the region the tile owns (:func:`owned_regions`), so each cell counts once and never near a
    tile's edge. Exact for a single GroupNorm; in a deep network each layer's statistics come
    from inputs that earlier per-tile normalisations shaped, so they drift from the untiled
    ones (more than :func:`mosaic_group_norm_stats` does, bench/RESULTS.md). Twice the work.
    """
    source = as_regions(x)
    owner = dict(zip(tiles, owned_regions(tiles), strict=True))
    moments: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
    current: list[Tile] = []

    def make_forward(name: str, norm: nn.GroupNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(activation: torch.Tensor) -> torch.Tensor:
            zero = torch.zeros((), dtype=torch.float64, device=activation.device)
            total, squares, count = moments.get(name, (zero, zero, 0))
            samples = activation.shape[0] // len(current)
            for index, tile in enumerate(current):
                part = activation[index * samples : (index + 1) * samples]
                core = _crop_owned(part, tile, owner[tile]).double()
                core = core.reshape(samples, norm.num_groups, -1)
                total = total + core.sum(-1)
                squares = squares + core.square().sum(-1)
                count += core.shape[-1]
            moments[name] = (total, squares, count)
            return _plain_group_norm(norm, activation)

        return forward

    with _patched_group_norms(net, make_forward):
        for batch in tile_batches(tiles, batch_size):
            current[:] = batch
            run(torch.cat([source.tile(t) for t in batch]))
    stats: GroupStats = {}
    for name, (total, squares, count) in moments.items():
        mean = total / count
        stats[name] = (mean.float(), (squares / count - mean.square()).clamp(min=0).float())
    return stats


def tiled_stream(
    run: Callable[[torch.Tensor], torch.Tensor],
    net: nn.Module,
    x: Source,
    emit: Emit,
    *,
    tiles: list[Tile],
    factor: float,
    ramp: int,
    stats: GroupStats | None = None,
    batch_size: int = 1,
) -> None:
    """``run(x)`` tile by tile, with the GroupNorms of ``net`` (the part of ``run`` that normalises)
    sharing statistics across tiles; outputs are blended with :func:`feather_weights` and handed
    to ``emit`` band by band, as soon as no later tile adds to the rows.

    ``tiles`` are in ``x``'s cells; output tile ``t`` is ``t`` scaled by ``factor`` (8 for a VAE
    decoder, 1/8 for an encoder); ``ramp`` is the blend ramp in output cells. ``stats`` are the
    shared statistics (e.g. :func:`mosaic_group_norm_stats`); ``None`` gathers them first in a
    pass over the tiles (:func:`tile_pass_group_norm_stats`). Then one pass: tiles of one shape
    run ``batch_size`` at a time, so memory is that of one batch of tiles plus the rows still
    being blended (about one row of tiles when ``tiles`` go row by row, as :func:`tile_grid`'s).
    """
    source = as_regions(x)
    if stats is None:
        stats = tile_pass_group_norm_stats(run, net, source, tiles=tiles, batch_size=batch_size)

    def scaled(t: Tile) -> Tile:
        return Tile(
            round(t.top * factor),
            round(t.left * factor),
            round(t.height * factor),
            round(t.width * factor),
        )

    batches = tile_batches(tiles, batch_size)
    # Rows above the first row of every tile still to come are final once a batch is blended.
    height = round(source.height * factor)
    final = [height] * (len(batches) + 1)
    for index in range(len(batches) - 1, -1, -1):
        final[index] = min([final[index + 1]] + [scaled(t).top for t in batches[index]])
    blender: _BandBlender | None = None
    weights: dict[tuple[int, int], torch.Tensor] = {}
    with shared_group_norm_stats(net, stats):
        for index, batch in enumerate(batches):
            inputs = [source.tile(t) for t in batch]
            results = run(torch.cat(inputs))
            if blender is None:
                blender = _BandBlender(round(source.width * factor), inputs[0].dtype, emit)
            for tile, result in zip(batch, results.float().split(inputs[0].shape[0]), strict=True):
                target = scaled(tile)
                key = (target.height, target.width)
                if key not in weights:
                    weights[key] = feather_weights(*key, ramp).to(result.device)
                blender.add(target, result, weights[key])
            del inputs, results
            blender.flush(final[index + 1])


def tiled_apply(
    run: Callable[[torch.Tensor], torch.Tensor],
    net: nn.Module,
    x: Source,
    *,
    tiles: list[Tile],
    factor: float,
    ramp: int,
    stats: GroupStats | None = None,
    batch_size: int = 1,
) -> torch.Tensor:
    """:func:`tiled_stream`'s whole output."""

    def stream(emit: Emit) -> None:
        tiled_stream(
            run, net, x, emit,
            tiles=tiles, factor=factor, ramp=ramp, stats=stats, batch_size=batch_size,
        )  # fmt: skip

    return collect(stream)


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


def _fits_untiled(height: int, width: int, *, tile: int) -> bool:
    return (height <= tile and width <= tile) or height * width <= UNTILED_TILES * tile**2


def _tiled_vae(
    run: Callable[[torch.Tensor], torch.Tensor],
    net: nn.Module,
    x: Regions,
    emit: Emit,
    *,
    tile: int,
    overlap: int,
    factor: int,
    encoder: bool,
    batch_size: int | None,
    statistics: str,
) -> None:
    """``run`` over VAE tiles of ``x`` (``tile`` and ``overlap`` in latent cells; ``factor`` the
    VAE's scale factor; ``x`` an image when ``encoder``, else latents), output to ``emit``."""
    if statistics not in STATISTICS:
        raise ValueError(f"unknown statistics {statistics!r}; expected one of {STATISTICS}")
    if batch_size is None:
        batch_size = default_vae_batch(x.device)
    cells = factor if encoder else 1  # x's cells per latent cell
    grid = tile_grid(x.height // cells, x.width // cells, tile, overlap)
    tiles = [t.scaled(cells) for t in grid]
    if statistics == "two-pass":
        stats = tile_pass_group_norm_stats(run, net, x, tiles=tiles, batch_size=batch_size)
    else:
        # Not tied to batch_size, so that the batch changes speed and memory, never the result.
        block = max(MIN_MOSAIC_BLOCK, tile // MOSAIC_BLOCKS)
        stats = mosaic_group_norm_stats(
            run, net, x, side=MOSAIC_BLOCKS * block * cells, block=block * cells, multiple=cells
        )
    tiled_stream(
        run, net, x, emit,
        tiles=tiles,
        factor=1 / factor if encoder else factor,
        ramp=overlap if encoder else overlap * factor,
        stats=stats,
        batch_size=batch_size,
    )  # fmt: skip


@torch.no_grad()
def tiled_vae_encode(
    vae: AutoencoderKL,
    image: Source,
    *,
    tile: int = 64,
    overlap: int = 8,
    batch_size: int | None = None,
    statistics: str = "mosaic",
) -> torch.Tensor:
    """Scaled VAE latent (mode of the posterior) of ``image`` in ``[-1, 1]``, tiled when the latent
    has more cells than :data:`UNTILED_TILES` tiles of ``tile`` latent cells square.

    ``image`` is a tensor or :class:`Regions` (read tile by tile: never whole when tiled); its
    sides must be multiples of the VAE's scale factor; ``tile`` and ``overlap`` are in latent
    cells; ``batch_size`` tiles per encoder forward, each encoded once (``None``:
    :func:`default_vae_batch`); ``statistics`` one of :data:`STATISTICS`.
    """
    return tiled_encode(
        lambda x: _encode(vae, x), vae.encoder, image, factor=vae_scale_factor(vae), tile=tile,
        overlap=overlap, batch_size=batch_size, statistics=statistics,
    )  # fmt: skip


@torch.no_grad()
def tiled_encode(
    run: Callable[[torch.Tensor], torch.Tensor],
    net: nn.Module,
    image: Source,
    *,
    factor: int,
    tile: int = 64,
    overlap: int = 8,
    batch_size: int | None = None,
    statistics: str = "mosaic",
) -> torch.Tensor:
    """``run(image)`` for an encoder that downsamples ``factor`` times with the VAE encoder's
    GroupNorms (``net``): the VAE encoder itself, or SpaSemSR's image encoder started from it;
    tiled as :func:`tiled_vae_encode` says."""
    source = as_regions(image)
    height, width = source.height // factor, source.width // factor
    if _fits_untiled(height, width, tile=tile):
        return run(source.whole())

    def stream(emit: Emit) -> None:
        _tiled_vae(
            run, net, source, emit, tile=tile, overlap=overlap, factor=factor,
            encoder=True, batch_size=batch_size, statistics=statistics,
        )  # fmt: skip

    return collect(stream)


@torch.no_grad()
def tiled_vae_decode_stream(
    vae: AutoencoderKL,
    latents: torch.Tensor,
    emit: Emit,
    *,
    tile: int = 64,
    overlap: int = 8,
    batch_size: int | None = None,
    statistics: str = "mosaic",
) -> None:
    """The image in ``[-1, 1]`` decoded from scaled ``latents``, handed to ``emit`` in bands of
    finished rows (never whole when tiled), tiled when they have more cells than
    :data:`UNTILED_TILES` tiles of ``tile`` cells square: ``batch_size`` tiles per decoder forward
    (``None``: :func:`default_vae_batch`), each decoded once, GroupNorm statistics shared by all
    tiles from ``statistics`` (one of :data:`STATISTICS`)."""
    height, width = latents.shape[-2:]
    if _fits_untiled(height, width, tile=tile):
        emit(0, _decode(vae, latents))
        return

    def run(z: torch.Tensor) -> torch.Tensor:
        return _decode(vae, z)

    _tiled_vae(
        run, vae.decoder, Regions.of(latents), emit, tile=tile, overlap=overlap,
        factor=vae_scale_factor(vae), encoder=False, batch_size=batch_size, statistics=statistics,
    )  # fmt: skip


def tiled_vae_decode(
    vae: AutoencoderKL,
    latents: torch.Tensor,
    *,
    tile: int = 64,
    overlap: int = 8,
    batch_size: int | None = None,
    statistics: str = "mosaic",
) -> torch.Tensor:
    """:func:`tiled_vae_decode_stream`'s whole image."""

    def stream(emit: Emit) -> None:
        tiled_vae_decode_stream(
            vae, latents, emit, tile=tile, overlap=overlap, batch_size=batch_size,
            statistics=statistics,
        )  # fmt: skip

    return collect(stream)
