"""NMS against a brute-force reference; IoU and box normalisation by hand."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.grounding.nms import batched_nms, box_iou, center_to_corners, nms, normalize_boxes


def reference_iou(a: list[float], b: list[float]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    overlap = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - overlap
    return overlap / union if union > 0 else 0.0


def reference_nms(
    boxes: list[list[float]], scores: list[float], labels: list[int], threshold: float
) -> list[int]:
    """The textbook loop: take the best remaining box, drop same-label boxes overlapping it."""
    remaining = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    while remaining:
        best = remaining.pop(0)
        kept.append(best)
        remaining = [
            i
            for i in remaining
            if labels[i] != labels[best] or reference_iou(boxes[i], boxes[best]) <= threshold
        ]
    return kept


def random_boxes(generator: torch.Generator, count: int, extent: float = 100.0) -> torch.Tensor:
    corners = torch.rand(count, 2, generator=generator) * extent
    sizes = torch.rand(count, 2, generator=generator) * extent / 3 + 1
    return torch.cat([corners, corners + sizes], dim=1).double()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    count=st.integers(0, 40),
    classes=st.integers(1, 4),
    threshold=st.sampled_from([0.1, 0.3, 0.5, 0.7]),
)
def test_batched_nms_matches_brute_force(
    seed: int, count: int, classes: int, threshold: float
) -> None:
    generator = torch.Generator().manual_seed(seed)
    boxes = random_boxes(generator, count)
    scores = torch.rand(count, generator=generator).double()
    labels = torch.randint(0, classes, (count,), generator=generator)
    expected = reference_nms(boxes.tolist(), scores.tolist(), labels.tolist(), threshold)
    assert batched_nms(boxes, scores, labels, threshold).tolist() == expected


def test_nms_keeps_equal_scores_in_input_order_and_suppresses_duplicates() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10.0]])
    scores = torch.tensor([0.5, 0.9, 0.5, 0.5])
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    labels = torch.tensor([0, 1, 0, 0])
    # Box 1 is another class: it no longer suppresses box 0, which suppresses its twin, box 3.
    assert batched_nms(boxes, scores, labels, 0.5).tolist() == [1, 0, 2]
    assert nms(boxes[:0], scores[:0], 0.5).tolist() == []


def test_box_iou_by_hand() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 2.0, 2.0]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[1 / 7, 0.0, 1.0]]))
    empty = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert box_iou(empty, empty).tolist() == [[0.0]]


def test_center_to_corners() -> None:
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.2, 0.2]])
    expected = torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.0, 0.8, 0.2, 1.0]])
    assert torch.allclose(center_to_corners(boxes), expected)


def test_normalize_boxes_divides_by_the_whole_image_clips_and_orders() -> None:
    pixel = torch.tensor(
        [
            [32.0, 16.0, 96.0, 48.0],  # inside a 128 x 64 image
            [-10.0, -5.0, 200.0, 70.0],  # spills over every edge
            [96.0, 48.0, 32.0, 16.0],  # corners swapped
        ]
    )
    normalised = normalize_boxes(pixel, width=128, height=64)
    expected = torch.tensor(
        [[0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 1.0, 1.0], [0.25, 0.25, 0.75, 0.75]]
    )
    assert torch.allclose(normalised, expected)
    assert normalised.min() >= 0 and normalised.max() <= 1
