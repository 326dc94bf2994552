"""The Spatial-Semantic ControlNet (arXiv 2603.14112, Fig. 2c; DESIGN 1.2 step 6).

A ControlNet copy of the SD UNet encoder (``from_unet``), built from diffusers blocks, whose
every cross-attention transformer block runs three attentions [F]:

* spatial-aware text-image attention ``h_s = Attn(Q = f, KV = T_spa)`` -- the copied UNet
  ``attn2``;
* degradation-aware text-image attention ``h_d = Attn(Q = f, KV = T_deg)`` -- a parallel
  attention, initialised as a copy of the same ``attn2`` [I];
* spatial-semantic attention ``h = Attn(Q = h_s, KV = h_d)``, added to ``h_s`` through a
  zero-initialised output so that a fresh ControlNet starts as the plain ControlNet copy [I].

``f`` is the block's features: ``conv_in(z_t) + GuidanceFusion(concat(ImageEncoder,
SemanticEncoder))``. Outputs: the usual zero-convolution residuals for the UNet's skip
connections and middle block, and the per-resolution "spatial-semantic conditional embedding"
(the last feature map of each level, before downsampling) read by the UNet decoder's
semantic-enhanced image attention. In training the same embeddings are tied to the frozen
``VAE(HR)`` and ``SAM(HR)`` features through light projection heads (the semantic degradation
constraint, :mod:`model.training.trainer`), so that what the decoder reads carries the clean image's
content.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn, get_down_block
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.utils.outputs import BaseOutput
from torch import nn

from model.blocks.attention import (
    INPUTS_KEY,
    PassThroughAttnProcessor,
    SpaSemSRAttentionInputs,
    cross_attention_sites,
    site_key,
    zero_module,
)
from model.blocks.encoders import GuidanceFusion

_STOCK_ATTENTION = AttnProcessor2_0()


@dataclass
class SpatialSemanticControlNetOutput(BaseOutput):
    """``down_block_res_samples`` / ``mid_block_res_sample`` go to the UNet's skips and middle
    block; ``embeddings[l]`` is the spatial-semantic conditional embedding at resolution level
    ``l``."""

    down_block_res_samples: tuple[torch.Tensor, ...]
    mid_block_res_sample: torch.Tensor
    embeddings: tuple[torch.Tensor, ...]


class SpatialSemanticAttention(nn.Module):
    """Weights one cross-attention block adds: degradation-aware and spatial-semantic attention."""

    def __init__(
        self,
        query_dim: int,
        text_dim: int,
        heads: int,
        dim_head: int,
        *,
        upcast_attention: bool = False,
    ) -> None:
        super().__init__()
        self.degradation_attn = Attention(
            query_dim=query_dim,
            cross_attention_dim=text_dim,
            heads=heads,
            dim_head=dim_head,
            upcast_attention=upcast_attention,
        )
        self.norm_spatial = nn.LayerNorm(query_dim)
        self.norm_degradation = nn.LayerNorm(query_dim)
        self.fusion_attn = Attention(
            query_dim=query_dim,
            cross_attention_dim=query_dim,
            heads=heads,
            dim_head=dim_head,
            upcast_attention=upcast_attention,
        )
        zero_module(self.fusion_attn.to_out[0])


class SpatialSemanticAttnProcessor:
    """Processor of a ControlNet ``attn2``: ``h = h_s + Attn(Q = h_s, KV = h_d)`` (Fig. 2c)."""

    def __init__(self, weights: SpatialSemanticAttention) -> None:
        self.weights = weights

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        spasemsr: SpaSemSRAttentionInputs | None = None,
    ) -> torch.Tensor:
        # spatial-aware text-image attention: Q = image features, KV = T_spa
        spatial = _STOCK_ATTENTION(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if spasemsr is None or spasemsr.degradation_text is None:
            return spatial
        weights = self.weights
        # degradation-aware text-image attention: Q = image features, KV = T_deg
        degradation = weights.degradation_attn(
            hidden_states, encoder_hidden_states=spasemsr.degradation_text
        )
        # spatial-semantic attention: Q = h_s, KV = h_d
        fused: torch.Tensor = weights.fusion_attn(
            weights.norm_spatial(spatial),
            encoder_hidden_states=weights.norm_degradation(degradation),
        )
        return spatial + fused


class SpatialSemanticControlNet(ModelMixin, ConfigMixin):  # type: ignore[misc]  # diffusers' own mixins disagree on config_name
    """ControlNet of Fig. 2c; hyper-parameters mirror ``ControlNetModel`` for SD-style UNets."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        conditioning_channels: int = 4 + 256,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1024,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        attention_head_dim: int | tuple[int, ...] = (5, 10, 20, 20),
        num_attention_heads: int | tuple[int, ...] | None = None,
        use_linear_projection: bool = True,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
    ) -> None:
        super().__init__()
        levels = len(down_block_types)
        if len(block_out_channels) != levels:
            raise ValueError(
                f"{len(block_out_channels)} block_out_channels for {levels} down blocks"
            )
        # diffusers' historical naming: num_attention_heads defaults to attention_head_dim
        heads = num_attention_heads or attention_head_dim
        heads_per_level = (heads,) * levels if isinstance(heads, int) else tuple(heads)
        layers_per_level = (
            (transformer_layers_per_block,) * levels
            if isinstance(transformer_layers_per_block, int)
            else tuple(transformer_layers_per_block)
        )
        cross_only = (
            (only_cross_attention,) * levels
            if isinstance(only_cross_attention, bool)
            else tuple(only_cross_attention)
        )

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        time_embed_dim = block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(
            block_out_channels[0], time_embed_dim, act_fn=act_fn
        )
        self.condition_fusion = GuidanceFusion(conditioning_channels, block_out_channels[0])

        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([_zero_conv(block_out_channels[0])])
        output_channel = block_out_channels[0]
        for i, down_block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            is_final_block = i == levels - 1
            self.down_blocks.append(
                get_down_block(
                    down_block_type,
                    num_layers=layers_per_block,
                    transformer_layers_per_block=layers_per_level[i],
                    in_channels=input_channel,
                    out_channels=output_channel,
                    temb_channels=time_embed_dim,
                    add_downsample=not is_final_block,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    cross_attention_dim=cross_attention_dim,
                    num_attention_heads=heads_per_level[i],
                    attention_head_dim=output_channel // heads_per_level[i],
                    downsample_padding=downsample_padding,
                    use_linear_projection=use_linear_projection,
                    only_cross_attention=cross_only[i],
                    upcast_attention=upcast_attention,
                    resnet_time_scale_shift=resnet_time_scale_shift,
                )
            )
            for _ in range(layers_per_block + (0 if is_final_block else 1)):
                self.controlnet_down_blocks.append(_zero_conv(output_channel))

        self.mid_block = UNetMidBlock2DCrossAttn(
            transformer_layers_per_block=layers_per_level[-1],
            in_channels=block_out_channels[-1],
            temb_channels=time_embed_dim,
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            output_scale_factor=mid_block_scale_factor,
            resnet_time_scale_shift=resnet_time_scale_shift,
            cross_attention_dim=cross_attention_dim,
            num_attention_heads=heads_per_level[-1],
            resnet_groups=norm_num_groups,
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
        )
        self.controlnet_mid_block = _zero_conv(block_out_channels[-1])

        sites = cross_attention_sites(self, ("down_blocks.", "mid_block."))
        self.spatial_semantic = nn.ModuleDict(
            {
                site_key(name): SpatialSemanticAttention(
                    attn.query_dim,
                    attn.cross_attention_dim,
                    attn.heads,
                    attn.inner_dim // attn.heads,
                    upcast_attention=upcast_attention,
                )
                for name, attn in sites
            }
        )
        self._install_processors()

    def _install_processors(self) -> None:
        for name, module in self.named_modules():
            if not isinstance(module, Attention) or not name.startswith(
                ("down_blocks.", "mid_block.")
            ):
                continue
            if site_key(name) in self.spatial_semantic:
                processor = SpatialSemanticAttnProcessor(self.site(name))
                module.set_processor(processor)  # type: ignore[arg-type]
            else:
                module.set_processor(PassThroughAttnProcessor())  # type: ignore[arg-type]

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        *,
        conditioning_channels: int,
        load_weights_from_unet: bool = True,
    ) -> SpatialSemanticControlNet:
        """A ControlNet shaped like ``unet``'s encoder; with ``load_weights_from_unet`` its shared
        blocks start as copies of the UNet's and each degradation-aware attention as a copy of
        its block's ``attn2``."""
        config = unet.config
        for unsupported in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type"):
            if config.get(unsupported) is not None:
                raise ValueError(
                    f"SpatialSemanticControlNet supports SD-style UNets; {unsupported} is set"
                )
        if config["mid_block_type"] != "UNetMidBlock2DCrossAttn":
            raise ValueError(f"unsupported mid block {config['mid_block_type']!r}")
        controlnet: SpatialSemanticControlNet = cls(
            in_channels=config["in_channels"],
            conditioning_channels=conditioning_channels,
            flip_sin_to_cos=config["flip_sin_to_cos"],
            freq_shift=config["freq_shift"],
            down_block_types=tuple(config["down_block_types"]),
            only_cross_attention=config["only_cross_attention"],
            block_out_channels=tuple(config["block_out_channels"]),
            layers_per_block=config["layers_per_block"],
            downsample_padding=config["downsample_padding"],
            mid_block_scale_factor=config["mid_block_scale_factor"],
            act_fn=config["act_fn"],
            norm_num_groups=config["norm_num_groups"],
            norm_eps=config["norm_eps"],
            cross_attention_dim=config["cross_attention_dim"],
            transformer_layers_per_block=config["transformer_layers_per_block"],
            attention_head_dim=config["attention_head_dim"],
            num_attention_heads=config["num_attention_heads"],
            use_linear_projection=config["use_linear_projection"],
            upcast_attention=config["upcast_attention"],
            resnet_time_scale_shift=config["resnet_time_scale_shift"],
        )
        if load_weights_from_unet:
            controlnet.conv_in.load_state_dict(unet.conv_in.state_dict())
            controlnet.time_proj.load_state_dict(unet.time_proj.state_dict())
            controlnet.time_embedding.load_state_dict(unet.time_embedding.state_dict())
            controlnet.down_blocks.load_state_dict(unet.down_blocks.state_dict())
            controlnet.mid_block.load_state_dict(unet.mid_block.state_dict())
            unet_modules = dict(unet.named_modules())
            for name, _ in cross_attention_sites(controlnet, ("down_blocks.", "mid_block.")):
                weights = controlnet.site(name)
                weights.degradation_attn.load_state_dict(unet_modules[name].state_dict())
        if controlnet.dtype != unet.dtype:
            controlnet.to(dtype=unet.dtype)  # type: ignore[call-arg]  # diffusers wraps `to`
        return controlnet

    def site(self, name: str) -> SpatialSemanticAttention:
        """The added attention weights at the cross-attention module ``name``."""
        weights = self.spatial_semantic[site_key(name)]
        assert isinstance(weights, SpatialSemanticAttention)
        return weights

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        *,
        spatial_text: torch.Tensor,
        degradation_text: torch.Tensor,
        guidance: torch.Tensor,
        conditioning_scale: float = 1.0,
        return_dict: bool = True,
    ) -> (
        SpatialSemanticControlNetOutput
        | tuple[tuple[torch.Tensor, ...], torch.Tensor, tuple[torch.Tensor, ...]]
    ):
        """``sample`` is the noisy latent ``z_t``, ``guidance`` is ``f`` at the same resolution."""
        # 1. time
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        t_emb = self.time_proj(timesteps.expand(sample.shape[0])).to(dtype=sample.dtype)
        emb = self.time_embedding(t_emb)

        # 2. input: noisy latent plus the zero-initialised projection of the visual guidance
        sample = self.conv_in(sample) + self.condition_fusion(guidance.to(sample.dtype))
        attention_kwargs = {INPUTS_KEY: SpaSemSRAttentionInputs(degradation_text=degradation_text)}

        # 3. down, keeping each level's last pre-downsampling map as its spatial-semantic embedding
        down_block_res_samples: tuple[torch.Tensor, ...] = (sample,)
        embeddings: list[torch.Tensor] = []
        for down_block in self.down_blocks:
            if getattr(down_block, "has_cross_attention", False):
                sample, res_samples = down_block(
                    hidden_states=sample,
                    temb=emb,
                    encoder_hidden_states=spatial_text,
                    cross_attention_kwargs=attention_kwargs,
                )
            else:
                sample, res_samples = down_block(hidden_states=sample, temb=emb)
            down_block_res_samples += res_samples
            embeddings.append(res_samples[self.config["layers_per_block"] - 1])

        # 4. mid
        sample = self.mid_block(
            sample, emb, encoder_hidden_states=spatial_text, cross_attention_kwargs=attention_kwargs
        )

        # 5. zero convolutions and scale
        down = tuple(
            block(res) * conditioning_scale
            for res, block in zip(down_block_res_samples, self.controlnet_down_blocks, strict=True)
        )
        mid = self.controlnet_mid_block(sample) * conditioning_scale
        if not return_dict:
            return down, mid, tuple(embeddings)
        return SpatialSemanticControlNetOutput(
            down_block_res_samples=down, mid_block_res_sample=mid, embeddings=tuple(embeddings)
        )


def _zero_conv(channels: int) -> nn.Module:
    return zero_module(nn.Conv2d(channels, channels, kernel_size=1))
