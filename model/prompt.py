"""The grounded prompt: what the spatial-aware MM model hands the pipeline (DESIGN 1.2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

Box = tuple[float, float, float, float]
"""``(x_lu, y_lu, x_rb, y_rb)`` normalised to [0, 1] of the whole image."""


@dataclass(frozen=True, kw_only=True)
class GroundedPrompt:
    """Object tags with one box each (a tag repeats per instance) and a degradation caption."""

    tags: tuple[str, ...] = ()
    boxes: tuple[Box, ...] = ()
    caption: str = ""
    estimates: dict[str, float] = field(default_factory=dict)
    """Measured degradation estimates (noise, blur, blockiness, ...) from the grounder."""

    def __post_init__(self) -> None:
        if len(self.tags) != len(self.boxes):
            raise ValueError(f"{len(self.tags)} tags but {len(self.boxes)} boxes: one box per tag")
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
        }


@dataclass(frozen=True, kw_only=True)
class GroundingResult:
    prompt: GroundedPrompt
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per grounding stage (``drm``, ``tagger``, ``detector``, ``caption``)."""


class Grounder(Protocol):
    """Turns an LR image into the grounded prompt (DESIGN 1.2 steps 2-4)."""

    def ground(
        self,
        image: Image.Image,
        *,
        tags_hint: tuple[str, ...] = (),
        caption_hint: str | None = None,
    ) -> GroundingResult: ...
