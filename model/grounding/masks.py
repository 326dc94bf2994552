"""Optional masks for the detected boxes: SAM with one box prompt per box.

Paper: Grounded-SAM (Ren et al. 2024) feeds Grounding DINO's boxes to SAM (Kirillov et al. 2023,
Sec. 3: a box is a sparse prompt; with ``multimask_output=False`` the decoder returns one mask per
prompt). SpaSemSR's spatial prompt is boxes only (DESIGN 1.2), so the masks are an extra the
grounder adds behind a flag; they are stored on a small grid (longest side ``grid``) as run-length
encodings so the prompt stays small enough for job details.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.nn.functional import interpolate
from transformers import SamImageProcessorPil, SamModel, SamProcessor

from model.pipeline.prompt import Box, Mask

from .modules import device_of, dtype_of, frozen

logger = logging.getLogger(__name__)

DEFAULT_GRID = 64
POSTPROCESS_CHUNK = 8
"""Boxes brought to full image size at once: bounds memory on large clean estimates."""


def grid_size(width: int, height: int, grid: int) -> tuple[int, int]:
    """``(height, width)`` of the mask grid: longest side ``grid``, the image's aspect ratio."""
    if grid < 1:
        raise ValueError(f"mask grid must be >= 1, got {grid}")
    if width >= height:
        return max(1, round(grid * height / width)), grid
    return grid, max(1, round(grid * width / height))


def make_sam_processor(image_processor: SamImageProcessorPil) -> SamProcessor:
    return SamProcessor(image_processor=image_processor)  # type: ignore[no-untyped-call]


class BoxMasker:
    """One SAM mask per normalised box, downsampled to a small grid and run-length encoded."""

    def __init__(
        self,
        model: SamModel,
        processor: SamProcessor,
        *,
        grid: int = DEFAULT_GRID,
        mask_threshold: float = 0.0,
    ) -> None:
        grid_size(1, 1, grid)  # validates
        self.model = frozen(model)
        self.processor = processor
        self.grid = grid
        self.mask_threshold = mask_threshold
        """Logit threshold of SAM's masks (transformers' ``post_process_masks`` default)."""

    @property
    def device(self) -> torch.device:
        return device_of(self.model)

    @torch.no_grad()
    def full_size_masks(self, image: Image.Image, boxes: Sequence[Box]) -> torch.Tensor:
        """Boolean ``(len(boxes), height, width)`` masks at the image's own size."""
        image = image.convert("RGB")
        width, height = image.size
        if not boxes:
            return torch.zeros((0, height, width), dtype=torch.bool)
        pixel_boxes = [
            [x0 * width, y0 * height, x1 * width, y1 * height] for x0, y0, x1, y1 in boxes
        ]
        inputs = self.processor(images=image, input_boxes=[pixel_boxes], return_tensors="pt")
        dtype = dtype_of(self.model)
        outputs = self.model(
            pixel_values=inputs["pixel_values"].to(self.device, dtype),
            input_boxes=inputs["input_boxes"].to(self.device, dtype),
            multimask_output=False,
        )
        low_res = outputs.pred_masks[0].float().cpu()  # (boxes, 1, h, w) logits
        chunks: list[torch.Tensor] = []
        for start in range(0, len(boxes), POSTPROCESS_CHUNK):
            # Unpad, then bilinear up to the image size and threshold the logits (SAM's own steps).
            full = self.processor.post_process_masks(  # type: ignore[no-untyped-call]
                [low_res[start : start + POSTPROCESS_CHUNK]],
                inputs["original_sizes"],
                inputs["reshaped_input_sizes"],
                mask_threshold=self.mask_threshold,
            )
            chunks.append(full[0][:, 0])
        return torch.cat(chunks)

    def masks(
        self, image: Image.Image, boxes: Sequence[Box], *, grid: int | None = None
    ) -> tuple[Mask, ...]:
        """One mask per box (same order), longest side ``grid`` (the masker's own by default)."""
        grid_hw = grid_size(image.width, image.height, self.grid if grid is None else grid)
        full = self.full_size_masks(image, boxes)
        if full.shape[0] == 0:
            return ()
        # A grid cell is on when most of the pixels it covers are ("area" averages them).
        coverage = interpolate(full[:, None].float(), size=grid_hw, mode="area")[:, 0]
        small = (coverage >= 0.5).numpy()
        return tuple(Mask.encode(mask) for mask in small)

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        *,
        grid: int = DEFAULT_GRID,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> BoxMasker:
        """A transformers SAM folder (or a hub id such as ``facebook/sam-vit-base`` where the
        network allows); the PIL image processor, so torchvision is not needed."""
        model = frozen(SamModel.from_pretrained(source, dtype=dtype), device)
        processor = make_sam_processor(SamImageProcessorPil.from_pretrained(source))
        return cls(model, processor, grid=grid)
