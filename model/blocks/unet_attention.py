"""SpaSemSR's additions to the frozen SD UNet (arXiv 2603.14112, Fig. 2d; DESIGN 1.1 and 1.2 step
7).

The UNet stays a stock diffusers ``UNet2DConditionModel`` so that real SD2 weights load
unchanged. :class:`SpaSemSRUNetAttention` owns the new, trained weights and installs attention
processors into the UNet's cross-attention (``attn2``) blocks:

* **spatial-aware text attention** (blue in Fig. 2d), in encoder and decoder blocks: a decoupled
  cross-attention in the style of IP-Adapter [I] -- the block's own query, new keys/values from
  ``T_spa`` -- whose zero-initialised output projection is added to the text cross-attention
  output;
* **semantic-enhanced image attention** (red in Fig. 2d), in decoder blocks only: a pixel-aware
  cross-attention in the style of PASD [I] -- keys/values from the ControlNet's spatial-semantic
  embedding at the same resolution, flattened -- again with a zero-initialised output.

Both outputs are zero at initialisation, so a fresh set of additions leaves the UNet's noise
prediction exactly as the stock UNet's. The weights are saved and loaded as their own model
folder (``save_pretrained`` / ``from_pretrained``), never inside the UNet's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn

from model.blocks.attention import (
    INPUTS_KEY,
    PassThroughAttnProcessor,
    SpaSemSRAttentionInputs,
    cross_attention_sites,
    multi_head_attention,
    site_key,
    zero_module,
)

if TYPE_CHECKING:
    from model.blocks.controlnet import SpatialSemanticControlNetOutput

_STOCK_ATTENTION = AttnProcessor2_0()


class SiteAttention(nn.Module):
    """The new weights at one UNet ``attn2``: spatial text K/V (+ image Q/K/V in the decoder), zero
    outputs."""

    def __init__(
        self,
        *,
        query_dim: int,
        inner_dim: int,
        heads: int,
        text_dim: int,
        image_channels: int | None,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.to_k_spa = nn.Linear(text_dim, inner_dim, bias=False)
        self.to_v_spa = nn.Linear(text_dim, inner_dim, bias=False)
        self.to_out_spa = zero_module(nn.Linear(inner_dim, query_dim))
        self.has_image_attention = image_channels is not None
        if image_channels is not None:
            self.to_q_img = nn.Linear(query_dim, inner_dim, bias=False)
            self.to_k_img = nn.Linear(image_channels, inner_dim, bias=False)
            self.to_v_img = nn.Linear(image_channels, inner_dim, bias=False)
            self.to_out_img = zero_module(nn.Linear(inner_dim, query_dim))


class SpaSemSRAttnProcessor:
    """Processor of a UNet ``attn2``: stock text attention + spatial text attention (+ image
    attention)."""

    def __init__(self, weights: SiteAttention, level: int) -> None:
        self.weights = weights
        self.level = level

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        spasemsr: SpaSemSRAttentionInputs | None = None,
    ) -> torch.Tensor:
        out = _STOCK_ATTENTION(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if spasemsr is None:
            return out
        weights = self.weights
        if spasemsr.spatial_text is not None:
            query = attn.to_q(hidden_states)
            spatial = multi_head_attention(
                query,
                weights.to_k_spa(spasemsr.spatial_text),
                weights.to_v_spa(spasemsr.spatial_text),
                weights.heads,
            )
            out = out + weights.to_out_spa(spatial)
        if weights.has_image_attention and spasemsr.semantic is not None:
            context = spasemsr.semantic[self.level].flatten(2).transpose(1, 2)  # (B, H*W, C)
            image = multi_head_attention(
                weights.to_q_img(hidden_states),
                weights.to_k_img(context),
                weights.to_v_img(context),
                weights.heads,
            )
            out = out + weights.to_out_img(image)
        return out


class SpaSemSRUNetAttention(ModelMixin, ConfigMixin):  # type: ignore[misc]  # diffusers' own mixins disagree on config_name
    """The trained attention additions of the UNet, one :class:`SiteAttention` per cross-attention
    block.

    ``sites`` lists, for each UNet ``attn2`` module path, its dimensions, its resolution
    ``level`` (index of the down block of the same resolution) and, for decoder sites, the
    channels of the ControlNet embedding at that level. Build it with :meth:`from_unet`.
    """

    @register_to_config
    def __init__(self, sites: list[dict[str, Any]]) -> None:
        super().__init__()
        self.attentions = nn.ModuleDict(
            {
                site_key(site["name"]): SiteAttention(
                    query_dim=site["query_dim"],
                    inner_dim=site["inner_dim"],
                    heads=site["heads"],
                    text_dim=site["text_dim"],
                    image_channels=site.get("image_channels"),
                )
                for site in sites
            }
        )

    @classmethod
    def from_unet(
        cls, unet: UNet2DConditionModel, *, copy_queries: bool = True
    ) -> SpaSemSRUNetAttention:
        """Additions for every cross-attention block of ``unet``'s encoder (``down_blocks``) and
        decoder (``up_blocks``); the middle block is left as it is (the figure marks encoder and
        decoder)."""
        levels = len(unet.config["block_out_channels"])
        sites: list[dict[str, Any]] = []
        for name, attn in cross_attention_sites(unet, ("down_blocks.", "up_blocks.")):
            part, index = name.split(".")[:2]
            decoder = part == "up_blocks"
            level = levels - 1 - int(index) if decoder else int(index)
            sites.append(
                {
                    "name": name,
                    "query_dim": attn.query_dim,
                    "inner_dim": attn.inner_dim,
                    "heads": attn.heads,
                    "text_dim": attn.cross_attention_dim,
                    "image_channels": unet.config["block_out_channels"][level] if decoder else None,
                    "level": level,
                }
            )
        additions: SpaSemSRUNetAttention = cls(sites=sites)
        if copy_queries:
            modules = dict(unet.named_modules())
            for site in sites:
                weights = additions.site(site["name"])
                if weights.has_image_attention:
                    weights.to_q_img.load_state_dict(modules[site["name"]].to_q.state_dict())
        if additions.dtype != unet.dtype:
            additions.to(dtype=unet.dtype)  # type: ignore[call-arg]  # diffusers wraps `to`
        return additions

    def site(self, name: str) -> SiteAttention:
        """The added weights at the UNet attention module ``name``."""
        weights = self.attentions[site_key(name)]
        assert isinstance(weights, SiteAttention)
        return weights

    def install(self, unet: UNet2DConditionModel) -> None:
        """Set SpaSemSR processors on ``unet``; the UNet's parameters and ``state_dict`` are not
        touched."""
        levels = {site["name"]: site["level"] for site in self.config["sites"]}
        processors: dict[str, Any] = {}
        for processor_name in unet.attn_processors:
            module_name = processor_name.removesuffix(".processor")
            if module_name in levels:
                processors[processor_name] = SpaSemSRAttnProcessor(
                    self.site(module_name), levels[module_name]
                )
            else:
                processors[processor_name] = PassThroughAttnProcessor()
        missing = set(levels) - {name.removesuffix(".processor") for name in unet.attn_processors}
        if missing:
            raise ValueError(
                f"these additions do not fit the UNet: no attention at {sorted(missing)[:3]}"
            )
        unet.set_attn_processor(processors)


def unet_with_control(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    *,
    text: torch.Tensor,
    spatial_text: torch.Tensor,
    control: SpatialSemanticControlNetOutput,
) -> torch.Tensor:
    """The UNet step of arXiv 2603.14112 Fig. 2(d): ε prediction with the ControlNet's residuals
    in the skips and middle, ``T_spa`` and the spatial-semantic embeddings in the added attention.

    ``text`` is what the frozen UNet's own cross-attention reads: the semantic (tag) prompt as
    Figure 2 routes it, or ``T_deg`` (the pipeline's ``unet_prompt``).
    """
    noise: torch.Tensor = unet(
        sample,
        timestep,
        encoder_hidden_states=text,
        down_block_additional_residuals=control.down_block_res_samples,
        mid_block_additional_residual=control.mid_block_res_sample,
        cross_attention_kwargs={
            INPUTS_KEY: SpaSemSRAttentionInputs(
                spatial_text=spatial_text, semantic=control.embeddings
            )
        },
    ).sample
    return noise
