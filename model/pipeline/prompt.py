"""The grounded prompt: what the spatial-aware MM model hands the pipeline (DESIGN 1.2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]
"""``(x_lu, y_lu, x_rb, y_rb)`` normalised to [0, 1] of the whole image."""


@dataclass(frozen=True)
class Mask:
    """A binary mask over the whole image as COCO's uncompressed run-length encoding.

    ``counts`` alternate background / foreground run lengths over the pixels in column-major
    order, starting with background (a leading 0 when the first pixel is foreground), so the JSON
    form ``{"size": [h, w], "counts": [...]}`` reads with pycocotools as it is.
    """

    size: tuple[int, int]
    """``(height, width)`` of the mask grid (a small fixed grid, not the image's pixels)."""
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        height, width = self.size
        if height < 1 or width < 1:
            raise ValueError(f"mask size must be positive, got {self.size}")
        if any(count < 0 for count in self.counts) or sum(self.counts) != height * width:
            raise ValueError(f"mask counts must be >= 0 and sum to {height}x{width}")

    @classmethod
    def encode(cls, mask: np.ndarray[Any, Any]) -> Mask:
        """Run-length encode a 2-D boolean (or 0/1) array."""
        if mask.ndim != 2:
            raise ValueError(f"a mask must be 2-D, got shape {mask.shape}")
        flat = np.asarray(mask, dtype=bool).ravel(order="F")
        # Run boundaries: where the value changes, plus both ends; a mask starting "on" gets a 0.
        changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        edges = np.concatenate(([0], changes, [flat.size]))
        counts = np.diff(edges).tolist()
        if flat.size and flat[0]:
            counts = [0, *counts]
        return cls(size=(int(mask.shape[0]), int(mask.shape[1])), counts=tuple(counts))

    def decode(self) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """The boolean ``(height, width)`` array."""
        values = np.arange(len(self.counts)) % 2 == 1
        flat = np.repeat(values, self.counts)
        return flat.reshape(self.size, order="F")

    def to_json(self) -> dict[str, Any]:
        return {"size": list(self.size), "counts": list(self.counts)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Mask:
        height, width = data["size"]
        return cls(size=(int(height), int(width)), counts=tuple(int(c) for c in data["counts"]))


@dataclass(frozen=True, kw_only=True)
class GroundedPrompt:
    """Object tags with one box each (a tag repeats per instance) and a degradation caption."""

    tags: tuple[str, ...] = ()
    boxes: tuple[Box, ...] = ()
    caption: str = ""
    estimates: dict[str, float] = field(default_factory=dict)
    """Measured degradation estimates (noise, blur, blockiness, ...) from the grounder."""
    masks: tuple[Mask, ...] = ()
    """Optional segmentation masks (SAM), none or one per box in the same order. Carried for
    whoever reads the grounding; no SpaSemSR block does (Fig. 2 feeds boxes only, through the
    position encoder), so grounders compute them only when asked and training never does."""

    def __post_init__(self) -> None:
        if len(self.tags) != len(self.boxes):
            raise ValueError(f"{len(self.tags)} tags but {len(self.boxes)} boxes: one box per tag")
        if self.masks and len(self.masks) != len(self.boxes):
            raise ValueError(
                f"{len(self.masks)} masks for {len(self.boxes)} boxes: none or one each"
            )
        for box in self.boxes:
            x0, y0, x1, y1 = box
            if not (0.0 <= x0 <= x1 <= 1.0 and 0.0 <= y0 <= y1 <= 1.0):
                raise ValueError(f"box {box} is not a normalised [x_lu, y_lu, x_rb, y_rb] box")

    def to_json(self) -> dict[str, Any]:
        return {
            "tags": list(self.tags),
            "boxes": [list(box) for box in self.boxes],
            "caption": self.caption,
            "estimates": dict(self.estimates),
            "masks": [mask.to_json() for mask in self.masks],
        }


@dataclass(frozen=True, kw_only=True)
class GroundingResult:
    prompt: GroundedPrompt
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per grounding stage (``drm``, ``tagger``, ``detector``, ``caption``; ``masks`` when
    the grounder segments its boxes)."""


class Grounder(Protocol):
    """Turns an LR image into the grounded prompt (DESIGN 1.2 steps 2-4)."""

    def ground(
        self,
        image: Image.Image,
        *,
        tags_hint: tuple[str, ...] = (),
        caption_hint: str | None = None,
    ) -> GroundingResult: ...
