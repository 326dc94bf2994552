"""Attention plumbing shared by the SpaSemSR ControlNet and the UNet additions.

SpaSemSR (arXiv 2603.14112, Fig. 2) adds attention to diffusers blocks without changing their
classes: a stock ``Attention`` module keeps its weights and gets a *processor* that also attends
to the extra conditions. The extra conditions of one forward pass travel in one object,
:class:`SpaSemSRAttentionInputs`, passed as ``cross_attention_kwargs={"spasemsr": inputs}``;
diffusers hands that keyword to every attention processor of the model, so every processor in a
SpaSemSR model accepts it (:class:`PassThroughAttnProcessor` for the attentions we leave as they
are).

Processors here are plain objects, not ``nn.Module``: the weights they use live in a module of
our own (the ControlNet, or the UNet additions), so a stock UNet's ``state_dict`` stays exactly
the stock one and real SD2 weights load into it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

INPUTS_KEY = "spasemsr"
"""The ``cross_attention_kwargs`` key that carries :class:`SpaSemSRAttentionInputs`."""


@dataclass(frozen=True)
class SpaSemSRAttentionInputs:
    """The extra attention conditions of one forward pass (batch-aligned with the latents).

    ``spatial_text`` is ``T_spa`` (tags with the aligned box add, Fig. 2a), ``degradation_text``
    is ``T_deg`` (the degradation-aware caption), ``semantic`` holds the ControlNet's
    spatial-semantic conditional embeddings, one ``(B, C_l, H_l, W_l)`` map per resolution level
    ``l`` (Fig. 2c -> d).
    """

    spatial_text: torch.Tensor | None = None
    degradation_text: torch.Tensor | None = None
    semantic: Sequence[torch.Tensor] | None = None


def multi_head_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int
) -> torch.Tensor:
    """Scaled dot-product attention over ``heads`` heads on ``(B, N, heads * d)`` projections."""
    batch = query.shape[0]
    head_dim = query.shape[-1] // heads
    q = query.view(batch, -1, heads, head_dim).transpose(1, 2)
    k = key.view(batch, -1, heads, head_dim).transpose(1, 2)
    v = value.view(batch, -1, heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)


class PassThroughAttnProcessor(AttnProcessor2_0):
    """diffusers' default SDPA processor that also accepts (and ignores) the SpaSemSR inputs.

    Installed on every attention we do not extend, so that passing ``spasemsr`` through
    ``cross_attention_kwargs`` neither warns nor changes the stock computation.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        spasemsr: SpaSemSRAttentionInputs | None = None,
    ) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def zero_module(module: torch.nn.Module) -> torch.nn.Module:
    """Zero every parameter of ``module`` (ControlNet's zero convolution / zero linear)."""
    for parameter in module.parameters():
        torch.nn.init.zeros_(parameter)
    return module


def cross_attention_sites(
    model: torch.nn.Module, prefixes: tuple[str, ...]
) -> list[tuple[str, Attention]]:
    """The cross-attention modules (``attn2`` of transformer blocks) under the given top-level
    children."""
    sites = []
    for name, module in model.named_modules():
        if (
            isinstance(module, Attention)
            and name.endswith(".attn2")
            and module.is_cross_attention
            and name.startswith(prefixes)
        ):
            sites.append((name, module))
    return sites


def site_key(name: str) -> str:
    """A module path as a ``ModuleDict`` key (dots are not allowed there)."""
    return name.replace(".", "_")
