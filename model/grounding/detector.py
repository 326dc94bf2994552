"""Boxes for the tags: Grounding DINO with Grounded-SAM's thresholds and class-wise NMS.

Paper: Grounded-SAM (Ren et al. 2024) as the spatial-aware MM model; Grounding DINO (Liu et al.
2023, Sec. 3.4: "sub-sentence" prompts ``"cat. dog."``, box threshold 0.25, text threshold 0.2),
then NMS at IoU 0.5 (DESIGN 1.3). Each kept query becomes one box labelled with the tag whose tokens
it scores highest, so a tag repeats once per instance.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import (
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessorPil,
    PreTrainedTokenizerBase,
)

from model.pipeline.prompt import Box

from .modules import device_of, dtype_of, frozen
from .nms import batched_nms, center_to_corners, normalize_boxes

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DetectorSettings:
    box_threshold: float = 0.25
    """Minimum best-token probability of a query for its box to be kept."""
    text_threshold: float = 0.2
    """Minimum probability on the tag's own tokens for the query to carry that tag."""
    nms_iou: float = 0.5
    max_detections: int = 20
    """At most this many boxes in all: each becomes tokens of the 77-token spatial prompt."""


@dataclass(frozen=True)
class Detection:
    tag: str
    score: float
    pixel_box: tuple[float, float, float, float]
    """``(x0, y0, x1, y1)`` in pixels of the image given to the detector."""
    box: Box
    """The same box normalised to [0, 1] of the whole image."""


@dataclass(frozen=True)
class TextPrompt:
    """A Grounding DINO caption and, for every tag, which of its token positions belong to it."""

    text: str
    tags: tuple[str, ...]
    encoding: dict[str, torch.Tensor]
    tag_token_mask: torch.Tensor
    """``(num_tags, seq_len)`` booleans."""


def caption_for_tags(tags: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """``"sky. water. sand."`` and each tag's character span in it."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    cursor = 0
    for tag in tags:
        text = tag.strip().lower()
        spans.append((cursor, cursor + len(text)))
        parts.append(text + ".")
        cursor += len(text) + 2  # the "." and the joining space
    return " ".join(parts), spans


class GroundingDinoDetector:
    """Open-vocabulary boxes for a list of tags (one prompt per group that fits the text length)."""

    def __init__(
        self,
        model: GroundingDinoForObjectDetection,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: GroundingDinoImageProcessorPil,
        settings: DetectorSettings | None = None,
    ) -> None:
        self.model = frozen(model)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.settings = settings or DetectorSettings()

    @property
    def device(self) -> torch.device:
        return device_of(self.model)

    @property
    def max_text_len(self) -> int:
        return int(self.model.config.max_text_len)

    def tag_groups(self, tags: Sequence[str]) -> list[tuple[str, ...]]:
        """Split ``tags`` into prompts of at most ``max_text_len`` tokens, specials included."""
        budget = self.max_text_len - 2
        groups: list[list[str]] = [[]]
        used = 0
        for tag in tags:
            cost = len(self.tokenizer(tag, add_special_tokens=False)["input_ids"]) + 1
            if cost > budget:
                logger.warning("tag %r is longer than the detector's text length; skipped", tag)
                continue
            if used + cost > budget and groups[-1]:
                groups.append([])
                used = 0
            groups[-1].append(tag)
            used += cost
        return [tuple(group) for group in groups if group]

    def encode_prompt(self, tags: Sequence[str]) -> TextPrompt:
        text, spans = caption_for_tags(tags)
        encoded = self.tokenizer(text, return_tensors="pt", return_offsets_mapping=True)
        offsets = encoded.pop("offset_mapping")[0]
        starts, ends = offsets[:, 0], offsets[:, 1]
        real = ends > starts  # special tokens have empty (0, 0) offsets
        mask = torch.stack([real & (starts >= start) & (ends <= end) for start, end in spans])
        return TextPrompt(text, tuple(tags), dict(encoded), mask)

    @torch.no_grad()
    def detect(
        self,
        image: Image.Image,
        tags: Sequence[str],
        *,
        settings: DetectorSettings | None = None,
    ) -> list[Detection]:
        """Boxes for ``tags`` on ``image``, best first, after class-wise NMS.

        ``settings`` overrides the detector's own thresholds for this call.
        """
        settings = settings or self.settings
        image = image.convert("RGB")
        tags = list(dict.fromkeys(t.strip().lower() for t in tags if t.strip()))
        groups = self.tag_groups(tags)
        if not groups:
            return []
        pixels = self.image_processor(images=image, return_tensors="pt")
        dtype = dtype_of(self.model)
        all_boxes: list[torch.Tensor] = []
        all_scores: list[torch.Tensor] = []
        all_labels: list[int] = []
        for group in groups:
            prompt = self.encode_prompt(group)
            outputs = self.model(
                pixel_values=pixels["pixel_values"].to(self.device, dtype),
                pixel_mask=pixels["pixel_mask"].to(self.device),
                **{key: value.to(self.device) for key, value in prompt.encoding.items()},
            )
            seq_len = prompt.tag_token_mask.shape[1]
            probs = outputs.logits[0, :, :seq_len].float().sigmoid().cpu()  # (queries, tokens)
            tag_scores = (probs[:, None, :] * prompt.tag_token_mask[None].float()).amax(dim=-1)
            best_score, best_tag = tag_scores.max(dim=-1)
            keep = (probs.max(dim=-1).values > settings.box_threshold) & (
                best_score > settings.text_threshold
            )
            boxes = center_to_corners(outputs.pred_boxes[0].float().cpu())[keep]
            all_boxes.append(boxes)
            all_scores.append(best_score[keep])
            all_labels.extend(tags.index(group[int(i)]) for i in best_tag[keep])
        boxes = torch.cat(all_boxes)
        scores = torch.cat(all_scores)
        labels = torch.tensor(all_labels, dtype=torch.long)
        # Grounding DINO's boxes are relative to the unpadded image; scale to its pixels.
        width, height = image.size
        pixel_boxes = boxes * torch.tensor([width, height, width, height], dtype=boxes.dtype)
        kept = batched_nms(pixel_boxes, scores, labels, settings.nms_iou)
        kept = kept[: settings.max_detections]
        normalised = normalize_boxes(pixel_boxes[kept], width, height)
        detections = []
        for row, index in enumerate(kept.tolist()):
            x0, y0, x1, y1 = (float(v) for v in pixel_boxes[index])
            nx0, ny0, nx1, ny1 = (float(v) for v in normalised[row])
            detections.append(
                Detection(
                    tag=tags[int(labels[index])],
                    score=float(scores[index]),
                    pixel_box=(x0, y0, x1, y1),
                    box=(nx0, ny0, nx1, ny1),
                )
            )
        return detections
