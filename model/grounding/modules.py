"""Typed helpers for the frozen grounding models (DESIGN 1.1: every grounding model is frozen)."""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def frozen(
    module: ModuleT,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> ModuleT:
    """``module`` in eval mode with gradients off, moved to ``device`` / ``dtype`` when given."""
    # Only the arguments given: diffusers warns about any dtype argument, even None.
    if device is not None:
        module.to(device)
    if dtype is not None:
        module.to(dtype)
    module.eval()
    module.requires_grad_(False)
    return module


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
