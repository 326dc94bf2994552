"""Degradation-aware captioners behind one interface: the measured template, or a captioning model.

DESIGN 1.2 step 4: which model wrote the paper's captions is not stated. The default composes the
caption from the scene words and the measured estimates (``degradation.compose_caption``). The model
backend (BLIP, Li et al. 2022, image-conditioned generation) describes the clean estimate in its own
words, and those words replace the scene phrase; the degradation clauses still come from the
measurements, since a captioning model trained on clean photos does not describe noise or blocking.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    BlipForConditionalGeneration,
    BlipImageProcessorPil,
    BlipProcessor,
)

from .degradation import CaptionThresholds, DegradationEstimates, compose_caption
from .modules import device_of, dtype_of, frozen

CAPTIONER_CONFIG = "captioner_config.json"


class Captioner(Protocol):
    """Writes the degradation-aware caption of one image."""

    def caption(self, image: Image.Image, *, estimates: DegradationEstimates, scene: str) -> str:
        """``image`` is the clean estimate; ``scene`` the tagger's scene words (may be empty)."""
        ...


class TemplateCaptioner:
    """The default: the paper-style template filled from measured estimates and scene words."""

    def __init__(self, thresholds: CaptionThresholds | None = None) -> None:
        self.thresholds = thresholds or CaptionThresholds()

    def caption(self, image: Image.Image, *, estimates: DegradationEstimates, scene: str) -> str:
        return compose_caption(estimates, scene, self.thresholds)


class BlipCaptioner:
    """BLIP describes the scene; the template adds the measured degradations."""

    def __init__(
        self,
        model: BlipForConditionalGeneration,
        processor: BlipProcessor,
        thresholds: CaptionThresholds | None = None,
        *,
        max_new_tokens: int = 20,
    ) -> None:
        self.model = frozen(model)
        self.processor = processor
        self.thresholds = thresholds or CaptionThresholds()
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        *,
        thresholds: CaptionThresholds | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> BlipCaptioner:
        model = frozen(BlipForConditionalGeneration.from_pretrained(source, dtype=dtype), device)
        settings_file = Path(source) / CAPTIONER_CONFIG
        settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        # The PIL image processor: the default one needs torchvision, absent from CPU images.
        processor = BlipProcessor(  # type: ignore[no-untyped-call]
            image_processor=BlipImageProcessorPil.from_pretrained(source),
            tokenizer=AutoTokenizer.from_pretrained(source),
        )
        return cls(model, processor, thresholds, max_new_tokens=settings.get("max_new_tokens", 20))

    def save_pretrained(self, directory: str | Path) -> None:
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        settings = {"max_new_tokens": self.max_new_tokens}
        (Path(directory) / CAPTIONER_CONFIG).write_text(json.dumps(settings) + "\n")

    @torch.no_grad()
    def describe(self, image: Image.Image) -> str:
        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt")
        generated = self.model.generate(
            pixel_values=inputs["pixel_values"].to(device_of(self.model), dtype_of(self.model)),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
        )
        decoded = self.processor.batch_decode(  # type: ignore[no-untyped-call]
            generated, skip_special_tokens=True
        )
        text = str(decoded[0])
        return text.strip().rstrip(".")

    def caption(self, image: Image.Image, *, estimates: DegradationEstimates, scene: str) -> str:
        description = self.describe(image)
        # "a photo of a dog on a beach" -> "a dog on a beach": the template says "image of" itself.
        for prefix in ("a picture of ", "a photo of ", "an image of ", "there is "):
            if description.lower().startswith(prefix):
                description = description[len(prefix) :]
        return compose_caption(estimates, description or scene, self.thresholds)
