"""``SpaSemSRPipeline``: spatial-semantic guided diffusion super-resolution (arXiv 2603.14112, Fig.
2).

The forward pass of DESIGN 1.2, as numbered steps in :meth:`SpaSemSRPipeline.__call__`:

1. bicubic upsampling of the LR image to ``scale x`` its size (the colour-fix reference), padded to
   a multiple the VAE and UNet can halve, computed region by region where it is needed (never held
   at full resolution: the tiled VAE encoder reads it tile by tile);
2. text, once per image: ``T_deg`` (degradation-aware caption) and the negative prompt through the
   frozen text encoder; ``T_spa`` (tags + aligned box add) once per tile, from the boxes that
   intersect it, and the tile's plain tag prompt, the text of the UNet's own cross-attention
   (``unet_prompt``, see :class:`SpaSemSRPipeline`);
3. scheduler by name (DDPM, DDIM, DPM-Solver++, UniPC) and its timesteps;
4. the start latent: the VAE latent of the upsampled LR noised to the first timestep (SeeSR's LR
   embedding start [I]); one noise tensor for the whole latent, shared by all tiles;
5. visual guidance, once per image (:mod:`model.blocks.encoders`): the image encoder's latent of the
   whole image (tiled as the VAE encoder is) and the semantic encoder's map of it; each tile's
   ``f = concat(ImageEncoder, SemanticEncoder)`` is read off them at its latent cells;
6. denoising ("Multi Denoise", Fig. 2d): per tile, the Spatial-Semantic ControlNet then the UNet
   with its added attention, classifier-free guidance with the negative prompt, Gaussian-blended
   tile predictions, one scheduler step over the whole latent; a callback after every step
   (progress, cancellation);
7. tiled VAE decode, crop to exactly ``scale x`` the input, colour fix (``none | adain | wavelet``),
   streamed region by region into the output, allocated once in its final type (uint8 RGB, or
   float for ``output_type="pt"``).

**Shape buckets** (``performance.tile_buckets``, see :mod:`model.pipeline.performance`): the tile
side comes from a fixed set, a tile smaller than its bucket is reflect-padded up to it (its latent
and its guidance) and its prediction cropped back before blending, so padded cells never carry blend
weight; tiles go through the denoiser in batches of :attr:`PerformanceSettings.tile_counts`.

**Memory**: beyond the model, a job holds its latents (1/64 of the output's pixels per channel),
the per-image encodings (the image latent, the semantic map, the distinct tile texts; a batch's
inputs are read off them at each step, so there is no copy per tile), the blending weights, the
output itself and per-region working buffers: the tiled VAE reads
its input by regions and hands its decoded rows to the colour fix band by band
(:func:`model.pipeline.tiling.tiled_vae_decode_stream`), so its full-width buffers are a row of
tiles high (the AdaIN colour fix alone holds the decoded image, for its whole-image moments).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.outputs import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer, SamVisionModel

from model.blocks.controlnet import SpatialSemanticControlNet
from model.blocks.encoders import ImageEncoder, SemanticMap, encode_semantic_map
from model.blocks.text import DEFAULT_NEGATIVE_PROMPT, TextConditioner, default_prompt
from model.blocks.unet_attention import SpaSemSRUNetAttention, unet_with_control
from model.pipeline.color import COLOR_FIX_MODES, apply_color_fix
from model.pipeline.performance import PerformanceSettings, attention_context, tile_bucket
from model.pipeline.prompt import Box, GroundedPrompt
from model.pipeline.tiling import (
    Regions,
    Tile,
    boxes_for_tile,
    gaussian_weights,
    tile_grid,
    tiled_encode,
    tiled_vae_decode_stream,
    tiled_vae_encode,
)

logger = logging.getLogger(__name__)

StageCallback = Callable[[str, int, int], None]
"""``(stage, step, total)``: ``encode`` and ``decode`` at 0 and 1 of 1, ``denoise`` after each step
1..N. An exception raised by the callback propagates unchanged (that is how a caller cancels)."""

SCHEDULERS: dict[str, tuple[type[Any], dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {"set_alpha_to_one": False}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {}),
}
SCALES = (2, 4)
UNET_PROMPTS = ("tags", "caption")
"""What the frozen UNet's cross-attention reads: the tile's tags, or ``T_deg`` (see the class)."""

OUTPUT_REGION = 512
"""Side in output pixels of the regions the output is assembled in (colour fix, conversion)."""

STREAM_ROWS = 128
"""Decoded rows the output stream colour-fixes and writes at a time (above its margin)."""

WAVELET_MARGIN = 32
"""Context around a region for the wavelet colour fix: its five à-trous levels reach
1 + 2 + 4 + 8 + 16 = 31 pixels, so a region with this margin is fixed as in the whole image."""

BICUBIC_MARGIN = 2
"""Low-resolution pixels around a region's window: bicubic taps reach 1 before and 2 after."""

Shape = tuple[int, int, int]
"""``(batch, latent height, latent width)`` of a denoiser forward."""


@dataclass
class SpaSemSRPipelineOutput(BaseOutput):
    """``images``: PIL images (or a ``(B, 3, H, W)`` tensor in [0, 1]); ``timings``: seconds per
    stage; ``prompt``: the grounded prompt used."""

    images: list[Image.Image] | torch.Tensor
    timings: dict[str, float]
    prompt: GroundedPrompt


@dataclass
class _ImageConditioning:
    """What every tile's conditioning is read from, computed once per image: ``T_deg`` per CFG
    half, the distinct tile texts (``T_spa``, UNet text; each per CFG half), the image encoder's
    latent of the whole image and the semantic encoder's map. A batch's inputs are read off them
    at each step (a crop, a bilinear read, concatenations: little next to one forward), so a job
    holds these per-image encodings, not one conditioning per tile."""

    text: torch.Tensor
    tile_texts: list[tuple[torch.Tensor, torch.Tensor]]
    image_latents: torch.Tensor
    semantic_map: SemanticMap
    out_h: int
    out_w: int
    bucket: int | None


@dataclass
class _TileConditioning:
    """One tile: its index into :attr:`_ImageConditioning.tile_texts`, the shape it runs at
    (its bucket's, else its own) and the blending weights of its real extent."""

    tile: Tile
    texts: int
    shape: tuple[int, int]
    weights: torch.Tensor | None


@dataclass
class _BatchConditioning:
    """A batch of same-shape tiles: what the loop needs to read their inputs at each step."""

    tiles: list[Tile]
    weights: list[torch.Tensor | None]
    texts: list[int]


@dataclass
class _BatchInputs:
    """A batch's conditioning for one step: per CFG half ``(T_deg, T_spa, UNet text)``, all
    halves joined for a single forward, and the tiles' guidance ``f`` (repeated per half only
    for the forward)."""

    halves: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    joined: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    guidance: torch.Tensor


def reflect_pad_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``x`` padded at the bottom and right to ``height x width`` by mirroring its content.

    ``reflect`` pads at most ``side - 1`` at once, so larger pads mirror again (a side of 1 is
    replicated first); mirrored content keeps the statistics the network sees close to the
    tile's own, unlike zeros.
    """
    if x.shape[-2] == 1 < height or x.shape[-1] == 1 < width:
        grow_h, grow_w = int(x.shape[-2] < height), int(x.shape[-1] < width)
        x = F.pad(x, (0, grow_w, 0, grow_h), mode="replicate")
    while x.shape[-2] < height or x.shape[-1] < width:
        rows, cols = x.shape[-2:]
        pad_h, pad_w = min(height - rows, rows - 1), min(width - cols, cols - 1)
        x = F.pad(x, (0, max(pad_w, 0), 0, max(pad_h, 0)), mode="reflect")
    return x


def padding_index(size: int, padded: int, *, reflect: bool) -> torch.Tensor:
    """For each of ``padded`` positions, the position of ``[0, size)`` that padding copies there:
    itself inside, mirrored (``F.pad``'s ``reflect``) or the last one (``replicate``) beyond."""
    index = torch.arange(padded)
    outside = index >= size
    beyond = 2 * (size - 1) - index if reflect else torch.full_like(index, size - 1)
    return torch.where(outside, beyond, index)


def unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """LR pixels as float32 in ``[-1, 1]``: 8-bit pixels (how the pipeline keeps a PIL input, a
    quarter of float32's memory) are mapped, float pixels are taken as already in range."""
    if pixels.dtype == torch.uint8:
        return (pixels.float() / 255.0 * 2.0 - 1.0).clamp(-1.0, 1.0)
    return pixels.float()


def semantic_input(low_res: torch.Tensor, out_h: int, out_w: int, size: int) -> torch.Tensor:
    """The upsampled image (``out_h x out_w``, unpadded) at the semantic encoder's resolution
    (longest side ``size``), straight from the LR (:func:`unit_range`): bicubic, as the
    upsampling, when that enlarges the LR, antialiased otherwise, so that no full-resolution image
    is built for an encoder that reads 1024 px. SAM's own resize then leaves it as it is."""
    ratio = size / max(out_h, out_w)
    height, width = max(1, round(out_h * ratio)), max(1, round(out_w * ratio))
    pixels = unit_range(low_res)
    if height >= low_res.shape[-2] and width >= low_res.shape[-1]:
        resized = F.interpolate(pixels, size=(height, width), mode="bicubic", align_corners=False)
    else:
        resized = F.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True)
    return resized.clamp(-1.0, 1.0)


def cell_fractions(
    start: int, count: int, factor: int, real: int, *, device: torch.device | None = None
) -> torch.Tensor:
    """The centres of latent cells ``[start, start + count)`` (``factor`` pixels each) as fractions
    of the ``real`` unpadded pixels; centres in the padding mirror back into the image, as the
    padding mirrors the image. Made on ``device``: the denoising loop reads them every step, and
    a copy from the host there would wait for the GPU's queued work each time."""
    cells = torch.arange(start, start + count, dtype=torch.float64, device=device)
    centres = (cells + 0.5) * factor
    centres = torch.where(centres > real, 2.0 * real - centres, centres)
    return centres / real


def regions(height: int, width: int, side: int) -> list[Tile]:
    """A partition of ``height x width`` into regions of at most ``side x side``, row by row."""
    return [
        Tile(top, left, min(side, height - top), min(side, width - left))
        for top in range(0, height, side)
        for left in range(0, width, side)
    ]


class _Upsampled:
    """The LR image upsampled ``scale x`` (bicubic, clamped to ``[-1, 1]``) and padded to
    ``height x width``, as regions computed when needed instead of one full-resolution tensor.

    A region comes from its LR window plus :data:`BICUBIC_MARGIN` pixels, which gives exactly the
    whole-image interpolation's values: the scales are powers of two, so source coordinates are
    exact in floating point, and the taps that the whole image clamps at its border are clamped
    at the same border. Padding (reflect, or replicate when the image is too small to reflect, as
    ``F.pad`` does it) is an index map onto the real pixels. ``low_res`` is read through
    :func:`unit_range` window by window, so 8-bit pixels are never held as float whole.
    """

    def __init__(self, low_res: torch.Tensor, scale: int, height: int, width: int) -> None:
        self.low_res = low_res
        self.scale = scale
        self.out_h, self.out_w = low_res.shape[-2] * scale, low_res.shape[-1] * scale
        self.height, self.width = height, width
        reflect = height - self.out_h < self.out_h and width - self.out_w < self.out_w
        self.rows = padding_index(self.out_h, height, reflect=reflect)
        self.cols = padding_index(self.out_w, width, reflect=reflect)

    def region(self, rows: slice, cols: slice) -> torch.Tensor:
        """``(1, 3, h, w)`` float32: the padded upsampled image at ``rows x cols``."""
        row_index, col_index = self.rows[rows], self.cols[cols]
        top, bottom = int(row_index.min()), int(row_index.max()) + 1
        left, right = int(col_index.min()), int(col_index.max()) + 1
        block = self._interpolate(top, bottom, left, right)
        device = block.device
        if int(rows.stop) > self.out_h:
            block = block.index_select(-2, (row_index - top).to(device))
        if int(cols.stop) > self.out_w:
            block = block.index_select(-1, (col_index - left).to(device))
        return block

    def _interpolate(self, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
        """Output pixels ``[top, bottom) x [left, right)`` of the unpadded upsampling."""
        scale, margin = self.scale, BICUBIC_MARGIN
        low_h, low_w = self.low_res.shape[-2:]
        first_row, last_row = (
            max(0, top // scale - margin),
            min(low_h, -(-bottom // scale) + margin),
        )
        first_col, last_col = (
            max(0, left // scale - margin),
            min(low_w, -(-right // scale) + margin),
        )
        window = unit_range(self.low_res[..., first_row:last_row, first_col:last_col])
        size = ((last_row - first_row) * scale, (last_col - first_col) * scale)
        upsampled = F.interpolate(window, size=size, mode="bicubic", align_corners=False)
        row, col = top - first_row * scale, left - first_col * scale
        block = upsampled[..., row : row + bottom - top, col : col + right - left]
        return block.clamp(-1.0, 1.0)

    def source(self, dtypes: tuple[torch.dtype, ...]) -> Regions:
        """The whole padded image as the tiled VAE encoder reads it, region by region on demand
        (so it never exists at full resolution), each region cast through ``dtypes`` in turn."""

        def read(rows: slice, cols: slice) -> torch.Tensor:
            block = self.region(rows, cols)
            for dtype in dtypes:
                block = block.to(dtype)
            return block

        return Regions(read, self.height, self.width, self.low_res.device)


class _ChannelMoments:
    """Per-channel mean and standard deviation of an image seen region by region (float64 sums),
    as :func:`model.pipeline.color.adain_color_fix` computes them on a whole image (unbiased
    variance)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.count = 0

    def add(self, block: torch.Tensor) -> None:
        flat = block.double().flatten(2)
        total, squares = flat.sum(2), flat.square().sum(2)
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += flat.shape[-1]

    def mean_std(self, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.total is not None and self.squares is not None
        mean = self.total / self.count
        variance = (self.squares - self.count * mean.square()) / max(self.count - 1, 1)
        std = (variance.clamp(min=0) + eps).sqrt()
        return mean.float()[..., None, None], std.float()[..., None, None]


class _Output:
    """The pipeline's result, allocated once at its final size and type and written region by
    region: a PIL RGB image (8 bits per channel), or a float ``(1, 3, H, W)`` tensor."""

    def __init__(self, height: int, width: int, output_type: str) -> None:
        self.tensor = torch.empty(1, 3, height, width) if output_type == "pt" else None
        self.image = None if output_type == "pt" else Image.new("RGB", (width, height))

    def write(self, top: int, left: int, pixels: torch.Tensor) -> None:
        """``pixels``: ``(1, 3, h, w)`` in ``[0, 1]`` at ``(top, left)``."""
        if self.tensor is not None:
            height, width = pixels.shape[-2:]
            self.tensor[..., top : top + height, left : left + width] = pixels.cpu()
            return
        assert self.image is not None
        array = (pixels[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
        self.image.paste(Image.fromarray(array), (left, top))

    def result(self) -> list[Image.Image] | torch.Tensor:
        if self.tensor is not None:
            return self.tensor
        assert self.image is not None
        return [self.image]


class _OutputStream:
    """Colour-fixes the decoded image as it arrives, in consecutive bands of rows top to bottom
    (:data:`model.pipeline.tiling.Emit`), and writes it to ``output`` region by region: what the
    whole-image colour fix gives, without its full-resolution intermediates.

    The wavelet fix sees :data:`WAVELET_MARGIN` pixels around each region, so rows are written
    once that many rows below them have arrived and kept until that many rows below them are
    written; without a fix rows are written as they come. AdaIN needs the whole image's moments
    before any pixel, so it holds every row until the last (the one case that holds the decoded
    image at full resolution)."""

    def __init__(self, reference: _Upsampled, color_fix: str, output: _Output) -> None:
        self.reference, self.color_fix, self.output = reference, color_fix, output
        self.margin = WAVELET_MARGIN if color_fix == "wavelet" else 0
        self.held: torch.Tensor | None = None
        """Decoded rows from :attr:`top` on, cropped to the reference's unpadded width."""
        self.top = 0
        self.arrived = 0
        """Decoded rows received so far, padding included."""
        self.written = 0
        """Output rows written so far."""

    def add(self, top: int, band: torch.Tensor) -> None:
        if top != self.arrived:
            raise ValueError(f"rows from {top} arrived, expected {self.arrived}")
        self.arrived += band.shape[-2]
        band = band[..., : max(0, self.reference.out_h - top), : self.reference.out_w]
        if self.color_fix == "adain":  # held whole until the last row anyway
            self._add_rows(band)
            return
        # A few rows at a time: what is held beside the band is then a small multiple of the
        # wavelet's margin, not a second copy of a band as wide as the image.
        for first in range(0, max(1, band.shape[-2]), STREAM_ROWS):
            self._add_rows(band[..., first : first + STREAM_ROWS, :])

    def _add_rows(self, band: torch.Tensor) -> None:
        """``band``: the next decoded rows, cropped to the output (possibly none)."""
        height = self.reference.out_h
        self.held = band if self.held is None else torch.cat([self.held, band], -2)
        arrived = self.top + self.held.shape[-2]
        if arrived >= height:
            ready = height
        elif self.color_fix == "adain":
            return
        else:
            ready = arrived - self.margin
        if ready > self.written:
            self._write(self.written, ready)
            self.written = ready
            keep = max(self.top, ready - self.margin)
            # A copy: a view would keep the whole band's storage until the next rows arrive.
            self.held, self.top = self.held[..., keep - self.top :, :].clone(), keep

    def _adain(self) -> tuple[torch.Tensor, ...]:
        """Whole-image moments of the decoded image and of the reference, region by region."""
        assert self.held is not None and self.top == 0
        image_moments, reference_moments = _ChannelMoments(), _ChannelMoments()
        for part in regions(self.reference.out_h, self.reference.out_w, OUTPUT_REGION):
            rows, cols = part.slices
            image_moments.add(self.held[..., rows, cols])
            reference_moments.add(self.reference.region(rows, cols))
        return (*image_moments.mean_std(), *reference_moments.mean_std())

    def _write(self, first: int, last: int) -> None:
        """Output rows ``[first, last)``, from the held rows around them."""
        assert self.held is not None
        height, width, margin = self.reference.out_h, self.reference.out_w, self.margin
        adain = self._adain() if self.color_fix == "adain" else ()
        for part in regions(last - first, width, OUTPUT_REGION):
            part_top = first + part.top
            top, left = max(0, part_top - margin), max(0, part.left - margin)
            bottom = min(height, part_top + part.height + margin)
            right = min(width, part.left + part.width + margin)
            image = self.held[..., top - self.top : bottom - self.top, left:right].float()
            if adain:
                image_mean, image_std, reference_mean, reference_std = adain
                fixed = (image - image_mean) / image_std * reference_std + reference_mean
            else:
                window = self.reference.region(slice(top, bottom), slice(left, right))
                fixed = apply_color_fix(image, window, self.color_fix)
            row, col = part_top - top, part.left - left
            fixed = fixed[..., row : row + part.height, col : col + part.width].clamp(-1.0, 1.0)
            self.output.write(part_top, part.left, (fixed + 1.0) / 2.0)


def stream_output(
    decoded: torch.Tensor, reference: _Upsampled, color_fix: str, output: _Output
) -> None:
    """Colour-fix the whole ``decoded`` image (cropped to the reference's unpadded size) against
    ``reference`` into ``output`` region by region, as :class:`_OutputStream` does band by band."""
    _OutputStream(reference, color_fix, output).add(0, decoded)


class SpaSemSRPipeline(DiffusionPipeline):
    """SpaSemSR super-resolution on diffusers components plus SpaSemSR's own blocks.

    Components: SD2 ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` (stock, frozen) and
    ``scheduler``; SpaSemSR's ``unet_attention`` (attention added to the UNet), ``controlnet``,
    ``image_encoder`` and ``semantic_encoder`` (SAM ViT). ``configuration`` names the shapes
    (``tiny``, ``sd2``) and ``trained`` says whether SpaSemSR's blocks carry trained weights;
    ``unet_prompt`` (one of :data:`UNET_PROMPTS`) says which text the frozen UNet's own
    cross-attention reads. All three are saved in ``model_index.json``.

    ``unet_prompt="tags"`` (the default) is Figure 2 as drawn: ``T_deg`` goes into the ControlNet
    only, and the UNet's cross-attention reads the semantic prompt, the tile's tags as one plain
    prompt (``T_spa`` before the box add), the kind of text SD was trained on. A frozen SD UNet
    reads a degradation caption ("A noisy, low-resolution image ...") as content to draw, and
    classifier-free guidance amplifies it. ``"caption"`` gives the UNet ``T_deg`` instead (SeeSR's
    choice, where one prompt serves both); training reads the same entry, so a model is trained
    and served with one choice.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        unet_attention: SpaSemSRUNetAttention,
        controlnet: SpatialSemanticControlNet,
        image_encoder: ImageEncoder,
        semantic_encoder: SamVisionModel,
        scheduler: SchedulerMixin,
        configuration: str = "custom",
        trained: bool = False,
        unet_prompt: str = "tags",
    ) -> None:
        super().__init__()
        if unet_prompt not in UNET_PROMPTS:
            raise ValueError(f"unet_prompt {unet_prompt!r}: expected one of {UNET_PROMPTS}")
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            unet_attention=unet_attention,
            controlnet=controlnet,
            image_encoder=image_encoder,
            semantic_encoder=semantic_encoder,
            scheduler=scheduler,
        )
        self.register_to_config(
            configuration=configuration, trained=trained, unet_prompt=unet_prompt
        )
        unet_attention.install(unet)
        self.vae_scale_factor = int(2 ** (len(vae.config["block_out_channels"]) - 1))
        self.latent_multiple = int(2 ** (len(unet.config["block_out_channels"]) - 1))
        self.text_conditioner = TextConditioner(tokenizer, text_encoder)
        # How the loop batches its work (CFG halves, tiles) and which attention kernels it
        # allows; model.pipeline.performance.apply_performance sets it together with dtypes and
        # compile.
        self.performance = PerformanceSettings()

    @property
    def pixel_multiple(self) -> int:
        """Output sides are padded to a multiple of this (VAE factor x UNet halvings)."""
        return self.vae_scale_factor * self.latent_multiple

    # -- 0. inputs ---------------------------------------------------------------------------------

    def check_inputs(
        self,
        image: Image.Image | torch.Tensor,
        *,
        scale: int,
        prompt: GroundedPrompt | None,
        num_inference_steps: int,
        guidance_scale: float,
        scheduler: str,
        color_fix: str,
        tile_size: int | None,
        tile_overlap: int | None,
    ) -> None:
        if isinstance(image, Image.Image):
            if image.width < 1 or image.height < 1:
                raise ValueError(f"the image is empty ({image.width}x{image.height})")
        elif isinstance(image, torch.Tensor):
            if (
                image.ndim not in (3, 4)
                or image.shape[-3] != 3
                or (image.ndim == 4 and image.shape[0] != 1)
            ):
                raise ValueError(
                    f"a tensor image must be (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}"
                )
        else:
            raise ValueError(f"image must be a PIL image or a tensor, got {type(image).__name__}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale}")
        if prompt is not None and not isinstance(prompt, GroundedPrompt):
            raise ValueError(
                f"prompt must be a GroundedPrompt or None, got {type(prompt).__name__}"
            )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(
                f"num_inference_steps must be a positive integer, got {num_inference_steps}"
            )
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if scheduler not in SCHEDULERS:
            raise ValueError(
                f"unknown scheduler {scheduler!r}; expected one of {tuple(SCHEDULERS)}"
            )
        if color_fix not in COLOR_FIX_MODES:
            raise ValueError(f"unknown colour fix {color_fix!r}; expected one of {COLOR_FIX_MODES}")
        if tile_size is not None and tile_size < self.pixel_multiple:
            raise ValueError(
                f"tile_size must be at least {self.pixel_multiple} pixels, got {tile_size}"
            )
        if tile_overlap is not None and tile_size is not None and not 0 <= tile_overlap < tile_size:
            raise ValueError(f"tile_overlap must be in [0, tile_size), got {tile_overlap}")

    # -- helpers -----------------------------------------------------------------------------------

    def make_scheduler(self, name: str) -> Any:
        """A fresh scheduler of kind ``name`` from the pipeline's scheduler configuration."""
        scheduler_class, overrides = SCHEDULERS[name]
        config = {k: v for k, v in self.scheduler.config.items() if not k.startswith("_")}
        return scheduler_class.from_config({**config, **overrides})

    def _to_tensor(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """``(1, 3, H, W)`` on the pipeline's device: a PIL image's 8-bit pixels as they are
        (read through :func:`unit_range`, a window at a time), a tensor in ``[0, 1]`` as float32
        in ``[-1, 1]``."""
        if isinstance(image, Image.Image):
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
            return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous().to(self.device)
        tensor = image.float()[None] if image.ndim == 3 else image.float()
        return (tensor.to(self.device) * 2.0 - 1.0).clamp(-1.0, 1.0)

    def _padded(self, side: int) -> int:
        """``side`` rounded up to a multiple the VAE and the UNet can halve."""
        return -(-side // self.pixel_multiple) * self.pixel_multiple

    def tile_side(self, tile_size: int | None, height: int, width: int) -> int | None:
        """The tile side in output pixels that a ``height x width`` output runs at.

        Without shape buckets, ``tile_size`` itself (``None``: one tile of the whole image). With
        them, the bucket ``tile_size`` maps onto (:func:`model.pipeline.performance.tile_bucket`;
        ``None``: the largest), or the smallest bucket that holds the whole padded image when
        that is smaller (a small image is padded to less).
        """
        buckets = self.performance.tile_buckets
        if not buckets:
            return tile_size
        side = tile_bucket(buckets, tile_size if tile_size is not None else buckets[-1])
        longest = max(self._padded(height), self._padded(width))
        holding = [bucket for bucket in buckets if longest <= bucket < side]
        return holding[0] if holding else side

    def _bucket(self, tile_size: int | None, height: int, width: int) -> int | None:
        """The latent side every tile of a ``height x width`` latent is padded to (``None``:
        no shape buckets, tiles run at their own shape)."""
        if not self.performance.tile_buckets:
            return None
        factor = self.vae_scale_factor
        side = self.tile_side(tile_size, height * factor, width * factor)
        assert side is not None
        return side // factor

    def _tiles(
        self, height: int, width: int, tile_size: int | None, tile_overlap: int | None
    ) -> list[Tile]:
        """Latent tiles of a ``height x width`` latent (:meth:`tile_side` in latent cells; one
        tile when untiled or when the latent fits one; a tile is never larger than the latent)."""
        factor = self.vae_scale_factor
        side = self.tile_side(tile_size, height * factor, width * factor)
        if side is None:
            return [Tile(0, 0, height, width)]
        tile = max(self.latent_multiple, side // self.pixel_multiple * self.latent_multiple)
        overlap = (side // 4 if tile_overlap is None else tile_overlap) // factor
        return tile_grid(height, width, tile, min(overlap, tile - 1), align=self.latent_multiple)

    def served_shapes(self) -> list[Shape]:
        """Every forward shape the denoiser runs with shape buckets: each bucket's latent side at
        each of :attr:`PerformanceSettings.forward_batches` (none without buckets)."""
        performance = self.performance
        sides = [side // self.vae_scale_factor for side in performance.tile_buckets]
        return [(batch, side, side) for side in sides for batch in performance.forward_batches]

    @torch.no_grad()
    def warm_up_shapes(self, *, repeats: int = 1) -> list[Shape]:
        """Run the denoiser forward ``repeats`` times at every :meth:`served_shapes` shape, so
        that compilation (and, from the second run, CUDA-graph capture) happens now and not on a
        request. The inputs match the loop's in everything Dynamo guards on: shapes, dtypes,
        device, contiguity, distinct tensors (aliasing), grad mode and the timestep's type."""
        shapes = self.served_shapes()
        dtype = self.unet.dtype
        text_shape = self.text_conditioner.encode("").shape[1:]
        channels = int(self.controlnet.config["conditioning_channels"])
        latent_channels = int(self.unet.config["in_channels"])
        timestep = torch.tensor(999)

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=self.device)

        for batch, height, width in shapes:
            for _ in range(repeats):
                self._forward(
                    zeros(batch, latent_channels, height, width),
                    timestep,
                    zeros(batch, *text_shape),
                    zeros(batch, *text_shape),
                    zeros(batch, *text_shape),
                    zeros(batch, channels, height, width),
                    1.0,
                )
        return shapes

    def _tile_box(self, tile: Tile, out_h: int, out_w: int) -> Box:
        """A latent tile as a normalised box of the unpadded output (padding clipped away)."""
        factor = self.vae_scale_factor
        return (
            min(1.0, tile.left * factor / out_w),
            min(1.0, tile.top * factor / out_h),
            min(1.0, (tile.left + tile.width) * factor / out_w),
            min(1.0, (tile.top + tile.height) * factor / out_h),
        )

    def semantic_map(self, low_res: torch.Tensor, scale: int) -> SemanticMap:
        """The semantic encoder's map of the whole upsampled image, one pass per image."""
        out_h, out_w = low_res.shape[-2] * scale, low_res.shape[-1] * scale
        configured = self.semantic_encoder.config.image_size
        image_size = configured if isinstance(configured, int) else int(configured[0])
        return encode_semantic_map(
            self.semantic_encoder, semantic_input(low_res, out_h, out_w, image_size)
        )

    def image_latents(self, upsampled: _Upsampled, *, tile: int) -> torch.Tensor:
        """The image encoder's latent of the whole padded upsampled image, once per image, tiled
        as the VAE encoder is (``tile`` latent cells, shared GroupNorm statistics), read by
        regions: no full-resolution input."""
        encoder = self.image_encoder
        pixels = upsampled.source((self.unet.dtype, encoder.dtype))
        return tiled_encode(
            encoder, encoder.encoder, pixels, factor=self.vae_scale_factor, tile=tile,
            overlap=tile // 8,
        )  # fmt: skip

    def tile_guidance(self, image: _ImageConditioning, tile: Tile) -> torch.Tensor:
        """``f`` of one tile: ``concat(image latent, semantic map)`` at the tile's latent cells,
        padded to its bucket (mirrored, as its latent is)."""
        factor = self.vae_scale_factor
        latent = image.image_latents[..., tile.slices[0], tile.slices[1]]
        semantic = image.semantic_map.at(
            cell_fractions(tile.top, tile.height, factor, image.out_h, device=latent.device),
            cell_fractions(tile.left, tile.width, factor, image.out_w, device=latent.device),
        )
        guidance = torch.cat([latent, semantic.to(latent.dtype)], dim=1).to(self.unet.dtype)
        if image.bucket is None:
            return guidance
        return reflect_pad_to(guidance, image.bucket, image.bucket)

    def _tile_texts(
        self,
        local: GroundedPrompt,
        text: torch.Tensor,
        negative: torch.Tensor,
        do_cfg: bool,
        cache: dict[tuple[str, ...], tuple[torch.Tensor, list[list[int]]]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A tile's ``(T_spa, UNet text)``, each per CFG half: the UNet reads the tile's plain tag
        prompt, or ``T_deg`` as the configuration's ``unet_prompt`` says."""
        spatial, tags = self.text_conditioner.encode_spatial_and_tags(
            local.tags, local.boxes, cache=cache
        )
        dtype = self.unet.dtype

        def with_negative(embedding: torch.Tensor) -> torch.Tensor:
            return torch.cat([negative, embedding.to(dtype)]) if do_cfg else embedding.to(dtype)

        unet_text = text if self.config["unet_prompt"] == "caption" else with_negative(tags)
        return with_negative(spatial), unet_text

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _batch_inputs(self, image: _ImageConditioning, batch: _BatchConditioning) -> _BatchInputs:
        """A batch's conditioning, read off the per-image encodings for one step.

        Every tensor is contiguous (an expanded view has other strides, and compiled modules
        guard on strides: it would compile once more) and its own (``torch.cat`` copies even one
        tensor: the UNet's text may hold ``T_deg``'s values, and compiled modules guard on
        aliasing too)."""
        text, count = image.text, len(batch.tiles)
        halves = [slice(0, 1), slice(1, 2)] if text.shape[0] == 2 else [slice(0, 1)]
        texts = [image.tile_texts[index] for index in batch.texts]
        inputs = [
            (
                text[half].expand(count, *text.shape[1:]).contiguous(),
                torch.cat([spatial[half] for spatial, _ in texts]),
                torch.cat([unet_text[half] for _, unet_text in texts]),
            )
            for half in halves
        ]
        t_deg, t_spa, t_unet = (torch.cat(parts) for parts in zip(*inputs, strict=True))
        return _BatchInputs(
            halves=inputs,
            joined=(t_deg, t_spa, t_unet),
            guidance=torch.cat([self.tile_guidance(image, tile) for tile in batch.tiles]),
        )

    def _forward(
        self,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        spatial_text: torch.Tensor,
        unet_text: torch.Tensor,
        guidance: torch.Tensor,
        conditioning_scale: float,
    ) -> torch.Tensor:
        """One ControlNet + UNet forward on a batch (every argument batch-aligned): ``text``
        (``T_deg``) conditions the ControlNet, ``unet_text`` the UNet's own cross-attention."""
        # One timestep type whatever the scheduler (a compiled module guards on dtypes); the
        # time embedding computes in float32 anyway, so the values are unchanged.
        timestep = timestep.to(device=self.device, dtype=torch.float32)
        if self.performance.cuda_graphs:
            # CUDA-graph trees replay per step; tell them a new step begins so that outputs of the
            # previous replay (already consumed) may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        with attention_context(self.performance.attention):
            control = self.controlnet(
                model_input,
                timestep,
                spatial_text=spatial_text,
                degradation_text=text,
                guidance=guidance,
                conditioning_scale=conditioning_scale,
            )
            noise = unet_with_control(
                self.unet, model_input, timestep, text=unet_text, spatial_text=spatial_text,
                control=control,
            )  # fmt: skip
        # Cloned so that a CUDA-graph replay of the next batch cannot overwrite it.
        return noise.clone() if self.performance.cuda_graphs else noise

    def _predict_noise_tiles(
        self,
        latents: list[torch.Tensor],
        timestep: torch.Tensor,
        prepared: _BatchInputs,
        guidance_scale: float,
        conditioning_scale: float,
    ) -> list[torch.Tensor]:
        """ε for tiles of one shape in one batch; with classifier-free guidance the batch is
        ``[uncond of every tile, cond of every tile]``, run as one forward when
        ``performance.cfg_batched`` else as two."""
        x = torch.cat(latents)
        halves = len(prepared.halves)
        f = prepared.guidance
        if self.performance.cfg_batched or halves == 1:
            t_deg, t_spa, t_unet = prepared.joined
            noise = self._forward(
                x.repeat(halves, 1, 1, 1),
                timestep,
                t_deg,
                t_spa,
                t_unet,
                f.repeat(halves, 1, 1, 1),
                conditioning_scale,
            )
            outputs = list(noise.chunk(halves))
        else:
            outputs = [
                self._forward(x, timestep, t_deg, t_spa, t_unet, f, conditioning_scale)
                for t_deg, t_spa, t_unet in prepared.halves
            ]
        if halves == 2:
            uncond, cond = outputs
            noise = uncond + guidance_scale * (cond - uncond)
        else:
            noise = outputs[0]
        return list(noise.split(latents[0].shape[0]))

    def _tile_batches(self, conditions: list[_TileConditioning]) -> list[_BatchConditioning]:
        """Tiles of the same (padded) shape in batches of :attr:`PerformanceSettings.tile_counts`
        tiles, largest first: at most ``tile_batch_size``, and only sizes from that fixed set."""
        counts = sorted(self.performance.tile_counts, reverse=True)
        groups: dict[tuple[int, int], list[_TileConditioning]] = {}
        for condition in conditions:
            groups.setdefault(condition.shape, []).append(condition)
        batches = []
        for group in groups.values():
            start = 0
            while start < len(group):
                size = next(count for count in counts if count <= len(group) - start)
                members = group[start : start + size]
                batches.append(
                    _BatchConditioning(
                        tiles=[c.tile for c in members],
                        weights=[c.weights for c in members],
                        texts=[c.texts for c in members],
                    )
                )
                start += size
        return batches

    def _tile_input(self, latents: torch.Tensor, tile: Tile, bucket: int | None) -> torch.Tensor:
        """A tile's latent, padded to its bucket."""
        crop = latents[..., tile.slices[0], tile.slices[1]]
        return crop if bucket is None else reflect_pad_to(crop, bucket, bucket)

    def _predict_noise(
        self,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        image: _ImageConditioning,
        batches: list[_BatchConditioning],
        total_weight: torch.Tensor | None,
        guidance_scale: float,
        conditioning_scale: float,
    ) -> torch.Tensor:
        """ε for the whole latent: every tile's prediction cropped back to its real extent (so
        padding never carries blend weight), Gaussian-blended where tiles overlap; a single tile
        (``total_weight`` ``None``) is the whole latent."""
        noise_pred: torch.Tensor | None = None
        if total_weight is not None:
            noise_pred = torch.zeros(model_input.shape, dtype=torch.float32, device=self.device)
        bucket = image.bucket
        for batch in batches:
            tile_inputs = [self._tile_input(model_input, tile, bucket) for tile in batch.tiles]
            tile_preds = self._predict_noise_tiles(
                tile_inputs,
                timestep,
                self._batch_inputs(image, batch),
                guidance_scale,
                conditioning_scale,
            )
            for tile, weights, tile_pred in zip(
                batch.tiles, batch.weights, tile_preds, strict=True
            ):
                prediction = tile_pred[..., : tile.height, : tile.width].float()
                if noise_pred is None:
                    return prediction
                assert weights is not None
                noise_pred[..., tile.slices[0], tile.slices[1]] += prediction * weights
        assert noise_pred is not None and total_weight is not None
        return noise_pred / total_weight

    # -- the pipeline ------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        image: Image.Image | torch.Tensor,
        *,
        scale: int = 4,
        prompt: GroundedPrompt | None = None,
        negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.5,
        scheduler: str = "dpmsolver++",
        generator: torch.Generator | None = None,
        color_fix: str = "wavelet",
        tile_size: int | None = 512,
        tile_overlap: int | None = None,
        conditioning_scale: float = 1.0,
        callback: StageCallback | None = None,
        output_type: str = "pil",
    ) -> SpaSemSRPipelineOutput:
        """Upscale ``image`` (PIL, or a tensor in [0, 1]) by ``scale`` (2 or 4).

        ``prompt`` is the grounded prompt (tags, boxes normalised to the image, caption);
        ``None`` uses :func:`model.blocks.text.default_prompt`. ``tile_size`` / ``tile_overlap`` are
        in output pixels (``None`` tile size: one tile whatever the size; ``None`` overlap: a
        quarter tile). Classifier-free guidance runs when ``guidance_scale > 1``.
        ``callback(stage, step, total)`` is called per stage and after every denoising step;
        whatever it raises propagates. The output is exactly ``scale x`` the input size.
        """
        # 0. check inputs
        self.check_inputs(
            image,
            scale=scale,
            prompt=prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            scheduler=scheduler,
            color_fix=color_fix,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
        )
        notify = callback or (lambda stage, step, total: None)
        prompt = prompt if prompt is not None else default_prompt()
        dtype = self.unet.dtype
        do_cfg = guidance_scale > 1.0
        timings: dict[str, float] = {}
        notify("encode", 0, 1)
        started = self._sync()

        # 1. upsample the LR image (the colour-fix reference) and pad it for the VAE and the UNet,
        #    by regions where they are needed
        low_res = self._to_tensor(image)
        out_h, out_w = low_res.shape[-2] * scale, low_res.shape[-1] * scale
        upsampled = _Upsampled(low_res, scale, self._padded(out_h), self._padded(out_w))
        latent_h = upsampled.height // self.vae_scale_factor
        latent_w = upsampled.width // self.vae_scale_factor
        tiles = self._tiles(latent_h, latent_w, tile_size, tile_overlap)
        bucket = self._bucket(tile_size, latent_h, latent_w)
        side = self.tile_side(tile_size, upsampled.height, upsampled.width)

        # 2. text, once per image: T_deg, the negative prompt, and T_spa of each tile from the
        #    boxes that intersect it, with the tile's plain tag prompt as the UNet's text unless
        #    the configuration gives it T_deg (tiles with the same tags share one encoder pass)
        text = self.text_conditioner.encode(prompt.caption).to(dtype)
        negative = self.text_conditioner.encode(negative_prompt or "").to(dtype)
        if do_cfg:
            text = torch.cat([negative, text])
        tag_cache: dict[tuple[str, ...], tuple[torch.Tensor, list[list[int]]]] = {}
        tile_texts: list[tuple[torch.Tensor, torch.Tensor]] = []
        text_of: dict[tuple[tuple[str, ...], tuple[Box, ...]], int] = {}
        texts_of_tiles = []
        for tile in tiles:
            local = boxes_for_tile(prompt, self._tile_box(tile, out_h, out_w))
            key = (tuple(local.tags), tuple(local.boxes))
            if key not in text_of:  # tiles with the same local prompt share their texts
                text_of[key] = len(tile_texts)
                tile_texts.append(self._tile_texts(local, text, negative, do_cfg, tag_cache))
            texts_of_tiles.append(text_of[key])
        timings["text"] = self._sync() - started

        # 3. scheduler and timesteps
        noise_scheduler = self.make_scheduler(scheduler)
        noise_scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = noise_scheduler.timesteps
        step_kwargs = (
            {"generator": generator}
            if "generator" in inspect.signature(noise_scheduler.step).parameters
            else {}
        )

        # 4. start latent: the noised VAE latent of the upsampled LR (SeeSR's LR embedding start)
        mark = self._sync()
        # VAE tiles follow the served tile side: a bucket is never above the requested size, so
        # the out-of-memory retry's halving still shrinks the VAE's working set too.
        vae_tile = side // self.vae_scale_factor if side is not None else max(latent_h, latent_w)
        # Read tile by tile (and block by block for the statistics): no full-resolution input.
        pixels = upsampled.source((dtype, self.vae.dtype))
        lr_latents = tiled_vae_encode(self.vae, pixels, tile=vae_tile, overlap=vae_tile // 8)
        noise = randn_tensor(
            lr_latents.shape, generator=generator, device=self.device, dtype=torch.float32
        )
        latents = noise_scheduler.add_noise(lr_latents.float(), noise, timesteps[:1]).to(dtype)
        del lr_latents, noise  # latent-sized: not held through the denoising
        timings["vae_encode"] = self._sync() - mark

        # 5. visual guidance, once per image: the image encoder's latent of the whole image and
        #    the semantic encoder's map (each tile reads its f off them at its latent cells, at
        #    each step); per tile its texts and its Gaussian blending weights over its real extent
        mark = self._sync()
        image_conditioning = _ImageConditioning(
            text=text,
            tile_texts=tile_texts,
            image_latents=self.image_latents(upsampled, tile=vae_tile),
            semantic_map=self.semantic_map(low_res, scale),
            out_h=out_h,
            out_w=out_w,
            bucket=bucket,
        )
        conditions = []
        total_weight = None
        if len(tiles) > 1:
            total_weight = torch.zeros(1, 1, latent_h, latent_w, device=self.device)
        for tile, texts in zip(tiles, texts_of_tiles, strict=True):
            weights = None
            if total_weight is not None:
                weights = gaussian_weights(tile.height, tile.width).to(self.device)
                total_weight[..., tile.slices[0], tile.slices[1]] += weights
            shape = (bucket, bucket) if bucket is not None else (tile.height, tile.width)
            conditions.append(_TileConditioning(tile, texts, shape, weights))
        batches = self._tile_batches(conditions)
        timings["guidance"] = self._sync() - mark
        timings["encode"] = self._sync() - started
        notify("encode", 1, 1)

        # 6. denoising: per tile ControlNet + UNet (tiles of one shape batched), Gaussian-blended
        #    ε, one step for all the latent
        mark = self._sync()
        for index, timestep in enumerate(timesteps):
            model_input = noise_scheduler.scale_model_input(latents, timestep)
            noise_pred = self._predict_noise(
                model_input,
                timestep,
                image_conditioning,
                batches,
                total_weight,
                guidance_scale,
                conditioning_scale,
            )
            latents = noise_scheduler.step(
                noise_pred, timestep, latents.float(), **step_kwargs
            ).prev_sample
            latents = latents.to(dtype)
            notify("denoise", index + 1, len(timesteps))
        timings["denoise"] = self._sync() - mark

        # 7. decode, then crop to exactly scale x input, colour fix and convert region by region
        #    into the output, allocated once; each band of decoded rows goes to the colour fix
        #    as soon as it is blended, so the decoded image is never whole (but for AdaIN)
        notify("decode", 0, 1)
        mark = self._sync()
        # What the denoising held at latent size (the scheduler's history of model outputs, the
        # last prediction, the blend weights) is not held through the decode too.
        del batches, conditions, image_conditioning, noise_scheduler, model_input, noise_pred
        del total_weight
        output = _Output(out_h, out_w, output_type)
        vae_latents = latents.to(self.vae.dtype)
        del latents
        tiled_vae_decode_stream(
            self.vae,
            vae_latents,
            _OutputStream(upsampled, color_fix, output).add,
            tile=vae_tile,
            overlap=vae_tile // 8,
        )
        del vae_latents
        images = output.result()
        timings["decode"] = self._sync() - mark
        notify("decode", 1, 1)
        return SpaSemSRPipelineOutput(images=images, timings=timings, prompt=prompt)
