"""Box utilities in plain torch: IoU, class-wise non-maximum suppression, normalisation.

Grounded-SAM suppresses Grounding DINO's duplicate boxes with NMS at IoU 0.5 (DESIGN 1.3).
torchvision's ``batched_nms`` is not available with the CPU torch build here, so this is the greedy
algorithm written with torch ops: sort by score, keep the best box, drop every same-class box
overlapping it by more than the threshold, repeat.
"""

from __future__ import annotations

import torch


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of ``(N, 4)`` corner boxes ``(x0, y0, x1, y1)``; degenerate boxes have area 0."""
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=0)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    return widths * heights


def box_iou(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``(N, M)`` of corner boxes; 0 where both boxes are empty."""
    top_left = torch.maximum(first[:, None, :2], second[None, :, :2])
    bottom_right = torch.minimum(first[:, None, 2:], second[None, :, 2:])
    overlap = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = box_area(first)[:, None] + box_area(second)[None, :] - overlap
    return torch.where(union > 0, overlap / union.clamp(min=1e-12), torch.zeros_like(union))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS; returns the kept indices, highest score first (ties: lower index first)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    # A stable sort keeps equal scores in input order, so the result is reproducible.
    order = torch.sort(-scores, stable=True).indices
    iou = box_iou(boxes[order], boxes[order])
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    keep: list[int] = []
    for position in range(len(order)):
        if bool(suppressed[position]):
            continue
        keep.append(position)
        suppressed |= iou[position] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Class-wise NMS: boxes only suppress boxes with the same label. Kept indices, best first.

    Boxes of different labels are shifted apart by more than the extent of all boxes, so one
    greedy pass never lets them overlap (the usual coordinate-offset trick).
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    extent = boxes.max() - boxes.min() + 1
    offsets = labels.to(boxes.dtype)[:, None] * extent
    return nms(boxes + offsets, scores, iou_threshold)


def center_to_corners(boxes: torch.Tensor) -> torch.Tensor:
    """``(cx, cy, w, h)`` to ``(x0, y0, x1, y1)``."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def normalize_boxes(pixel_boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Pixel corner boxes of a ``width x height`` image to [0, 1] of the whole image.

    Corners are ordered (x0 <= x1, y0 <= y1) and clipped to the image, which is what the
    ``GroundedPrompt`` box contract requires.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scale = torch.tensor([width, height, width, height], dtype=pixel_boxes.dtype)
    boxes = (pixel_boxes / scale.to(pixel_boxes.device)).clamp(0.0, 1.0)
    x0 = torch.minimum(boxes[:, 0], boxes[:, 2])
    x1 = torch.maximum(boxes[:, 0], boxes[:, 2])
    y0 = torch.minimum(boxes[:, 1], boxes[:, 3])
    y1 = torch.maximum(boxes[:, 1], boxes[:, 3])
    return torch.stack([x0, y0, x1, y1], dim=-1)
