"""Semantic-enhanced visual guidance (arXiv 2603.14112, Fig. 2b; DESIGN 1.2 step 5).

Two trained encoders read the LR image **bicubically upsampled to the output size**, not the raw
LR, in training and at inference alike [I] (SeeSR / XPSR / PASD practice): the image encoder has
the VAE encoder's 8x downsampling, so only the upsampled image gives features on the latent grid
the ControlNet and the denoised latent share, pixel for pixel, at scale 2 and 4 alike; and its
target, ``VAE(HR)``, is computed from an image of that same size. SAM resizes any input to its
own 1024-px square, so for it the upsampling only fixes the geometry (the same crop of the same
grid as the image encoder). What the LR *measures* (noise, blur, blockiness in the caption) is
read off the raw LR, where the degradations live at their own scale.

* the **image encoder**, latent-shaped, trained towards ``VAE(HR)`` (the "VAE degradation" term
  of ``L_SemDeg``, Eq. 11-12). Ours [I] is the SD VAE encoder architecture (diffusers
  ``Encoder``) with a single latent output, initialised from the VAE so that it starts at the
  scaled VAE latent;
* the **semantic encoder**, trained towards ``SAM(HR)`` (the "semantic degradation" term). Ours
  [I] is transformers' ``SamVisionModel``, initialised from SAM; its ``(C_sam, 64, 64)``
  embedding of a 1024-px SAM input is resized to the latent grid.

**Once per image** at inference [I]: SAM's cost does not depend on its input's size (it resizes
to 1024 px), so one SAM pass over the whole image replaces one per tile (25 passes for a 2048²
output at 512-px tiles); each tile reads its features off that map (:class:`SemanticMap`) at its
latent cells. A tile then sees SAM's reading of the whole scene at the image's scale rather than
of its own crop blown up to 1024 px: the context a tile lacks is what SAM's segment-level
features are for, and a training patch (one tile) is encoded exactly as a one-tile image.

``f = concat(ImageEncoder(LR), SemanticEncoder(LR))`` enters the ControlNet through a
zero-initialised convolution (:class:`GuidanceFusion`) added to its first block's features
[F]/[I].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.autoencoders.vae import Encoder
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers import SamVisionModel

from model.blocks.attention import zero_module

SAM_PIXEL_MEAN = (0.485, 0.456, 0.406)
SAM_PIXEL_STD = (0.229, 0.224, 0.225)


class ImageEncoder(ModelMixin, ConfigMixin):  # type: ignore[misc]  # diffusers' own mixins disagree on config_name
    """LR image in ``[-1, 1]`` -> ``(B, latent_channels, H / 8, W / 8)``, meant to match the scaled
    ``VAE(HR)``."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 4,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4,
        block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        mid_block_add_attention: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=latent_channels,
            down_block_types=tuple(down_block_types),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
            double_z=False,
            mid_block_add_attention=mid_block_add_attention,
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        latent: torch.Tensor = self.encoder(image)
        return latent

    @classmethod
    def from_vae(cls, vae: AutoencoderKL) -> ImageEncoder:
        """Start from the VAE encoder, folding ``quant_conv``'s mean half and the latent scaling
        into ``conv_out``.

        At initialisation ``ImageEncoder(x) == (VAE.encode(x).mode() - shift) * scaling_factor``
        exactly up to float rounding, i.e. the target of the VAE-degradation constraint evaluated
        on its input.
        """
        config = vae.config
        image_encoder: ImageEncoder = cls(
            in_channels=config["in_channels"],
            latent_channels=config["latent_channels"],
            down_block_types=tuple(config["down_block_types"]),
            block_out_channels=tuple(config["block_out_channels"]),
            layers_per_block=config["layers_per_block"],
            norm_num_groups=config["norm_num_groups"],
            act_fn=config["act_fn"],
            mid_block_add_attention=config.get("mid_block_add_attention", True),
        )
        state = {k: v.detach().clone() for k, v in vae.encoder.state_dict().items()}
        weight, bias = state.pop("conv_out.weight"), state.pop("conv_out.bias")
        latent = config["latent_channels"]
        if vae.quant_conv is not None:
            mix = vae.quant_conv.weight.detach()[:latent, :, 0, 0]
            weight = torch.einsum("om,mikl->oikl", mix, weight)
            assert vae.quant_conv.bias is not None
            bias = mix @ bias + vae.quant_conv.bias.detach()[:latent]
        else:
            weight, bias = weight[:latent], bias[:latent]
        scale = float(config["scaling_factor"])
        shift = float(config.get("shift_factor") or 0.0)
        state["conv_out.weight"] = weight * scale
        state["conv_out.bias"] = (bias - shift) * scale
        image_encoder.encoder.load_state_dict(state)
        if image_encoder.dtype != vae.dtype:
            image_encoder.to(dtype=vae.dtype)  # type: ignore[call-arg]  # diffusers wraps `to`
        return image_encoder


def sam_pixel_values(images: torch.Tensor, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM's preprocessing on ``[-1, 1]`` images: longest side to ``image_size``, ImageNet
    normalisation, zero padding to a square at the bottom and right. Returns the pixels and the
    unpadded ``(h, w)``."""
    height, width = images.shape[-2:]
    ratio = image_size / max(height, width)
    new_h, new_w = max(1, round(height * ratio)), max(1, round(width * ratio))
    x = (images.float() + 1.0) / 2.0
    if (new_h, new_w) != (height, width):
        x = F.interpolate(
            x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
        )
    mean = torch.tensor(SAM_PIXEL_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    x = F.pad(x, (0, image_size - new_w, 0, image_size - new_h))
    return x.to(images.dtype), (new_h, new_w)


def semantic_features(
    semantic_encoder: SamVisionModel, images: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """The semantic encoder's embedding of ``images`` (``[-1, 1]``), cropped to the unpadded region
    and resized to the latent grid ``size``: ``(B, output_channels, *size)``."""
    features = encode_semantic_map(semantic_encoder, images).features
    return F.interpolate(features, size=size, mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class SemanticMap:
    """The semantic encoder's embedding of one whole image, read at any points of the image.

    ``features`` are the embedding cells that cover the image (SAM pads its input at the bottom
    and right); ``extent`` is the image's height and width in cells (fractional: the last cell
    may be partly padding).
    """

    features: torch.Tensor
    extent: tuple[float, float]

    def at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``(1, C, len(rows), len(cols))``: bilinear features at the points whose positions are
        ``rows`` and ``cols`` as fractions of the image's height and width, clamped at the
        border. At the cell centres of a ``H x W`` grid over the image (``(i + 0.5) / H``) this is
        :func:`semantic_features`'s resize, for a grid whose cells cover the image exactly."""
        cells_h, cells_w = self.features.shape[-2:]
        # grid_sample's coordinates with align_corners=False: -1 and 1 are the outer edges of
        # the first and last cell, so a position p in cells is 2 p / cells - 1
        y = 2.0 * rows.double() * self.extent[0] / cells_h - 1.0
        x = 2.0 * cols.double() * self.extent[1] / cells_w - 1.0
        grid_y, grid_x = torch.meshgrid(y, x, indexing="ij")
        grid = torch.stack([grid_x, grid_y], dim=-1)[None].to(self.features)
        return F.grid_sample(
            self.features, grid, mode="bilinear", padding_mode="border", align_corners=False
        )


def encode_semantic_map(semantic_encoder: SamVisionModel, image: torch.Tensor) -> SemanticMap:
    """The semantic encoder's embedding of ``image`` (``(B, 3, h, w)`` in ``[-1, 1]``, any size:
    SAM's preprocessing resizes it), for reading at any points (:meth:`SemanticMap.at` takes one
    image)."""
    configured = semantic_encoder.config.image_size
    image_size = configured if isinstance(configured, int) else int(configured[0])
    pixels = image.to(semantic_encoder.dtype)
    pixel_values, (valid_h, valid_w) = sam_pixel_values(pixels, image_size)
    embedding = semantic_encoder(pixel_values=pixel_values).last_hidden_state
    grid = embedding.shape[-1]
    extent = (valid_h * grid / image_size, valid_w * grid / image_size)
    rows, cols = (max(1, math.ceil(cells)) for cells in extent)
    return SemanticMap(features=embedding[..., :rows, :cols], extent=extent)


def visual_guidance(
    image_encoder: ImageEncoder, semantic_encoder: SamVisionModel, images: torch.Tensor
) -> torch.Tensor:
    """``f = concat(ImageEncoder(LR), SemanticEncoder(LR))`` at latent resolution (Fig. 2b, the
    circled C)."""
    latent = image_encoder(images.to(image_encoder.dtype))
    semantic = semantic_features(semantic_encoder, images, size=latent.shape[-2:])
    return torch.cat([latent, semantic.to(latent.dtype)], dim=1)


class GuidanceFusion(nn.Module):
    """The zero-initialised projection of ``f`` into the ControlNet's first block [F]/[I].

    Zero at initialisation, so a fresh ControlNet's features do not depend on the guidance yet.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = zero_module(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))

    def forward(self, guidance: torch.Tensor) -> torch.Tensor:
        projected: torch.Tensor = self.proj(guidance)
        return projected
