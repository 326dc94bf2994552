"""The grounding stage: DRM -> tagger -> detector -> caption, as one ``Grounder``.

Paper: the "Spatial-aware MM Model" fed by the DRM's clean estimate at inference (arXiv 2603.14112,
Fig. 2 (a); DESIGN 1.2 steps 2-4 and 1.3). Tags and boxes are read off the clean estimate; the
degradation estimates are measured on the LR input itself, since they describe what the user sent.

Hints (``ground(..., tags_hint=, caption_hint=)``):

- ``tags_hint`` **augments** the tagger: the user's tags come first and are always sent to the
  detector, the tagger's tags fill the remaining ``top_k`` places. A hinted tag the detector finds
  no box for keeps one box covering the whole image, so the user's words always reach the prompt; a
  tagger tag without a box is dropped (Grounded-SAM's behaviour).
- ``caption_hint`` **replaces the scene words** of the caption by default ("A noisy, low-resolution
  image of <hint>. The image exhibits ..."), so the measured degradation clauses stay; with
  ``caption_hint_mode="full"`` in the config it replaces the whole caption verbatim.

Folder layout written by :meth:`SpaSemSRGrounder.save_pretrained`::

    grounder_config.json   settings + where each component lives
    vocabulary.txt         the tag vocabulary
    drm/                   diffusers layout (config.json + diffusion_pytorch_model.safetensors)
    tagger/                transformers CLIPModel + CLIPTokenizer + image processor
    detector/              transformers GroundingDinoForObjectDetection + tokenizer + processor
    captioner/             optional, transformers BLIP folder
    sam/                   optional, transformers SamModel + processor (``masks`` in the config)

Masks: with ``masks=True`` in the config the grounder runs SAM on the clean estimate with each box
as a prompt, after the detector (timing key ``masks``), and the prompt carries one run-length
encoded mask per box on a grid of longest side ``mask_grid``. Off by default.

A component entry may instead name an absolute folder, a hub id (where the network allows), or, for
the DRM, a published ``.pth`` / ``.safetensors`` checkpoint file (BSRNet, RealESRNet x4 / x2).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPModel,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessorPil,
)

from model.pipeline.prompt import Box, GroundedPrompt, GroundingResult, Mask

from .captioner import BlipCaptioner, Captioner, TemplateCaptioner
from .degradation import CaptionThresholds, estimate_degradations, scene_phrase
from .detector import Detection, DetectorSettings, GroundingDinoDetector
from .drm import RRDBNet, tiled_forward
from .masks import BoxMasker
from .modules import device_of, dtype_of, frozen
from .tagger import ClipTagger, TaggerSettings, TagVocabulary, merge_tags

logger = logging.getLogger(__name__)

WHOLE_IMAGE: Box = (0.0, 0.0, 1.0, 1.0)
MAX_HINT_TAGS = 32
MAX_TAG_CHARS = 64
MAX_CAPTION_CHARS = 500
STAGES = ("drm", "tagger", "detector", "caption")
MASK_STAGE = "masks"
"""Timing key of the optional SAM stage, between ``detector`` and ``caption``."""


@dataclass(frozen=True, kw_only=True)
class GrounderConfig:
    tagger: TaggerSettings = field(default_factory=TaggerSettings)
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    caption: CaptionThresholds = field(default_factory=CaptionThresholds)
    drm_tile: int = 256
    """DRM tile side in input pixels (memory bound on large inputs)."""
    drm_overlap: int = 16
    drm_max_side: int | None = 512
    """Longer inputs are downscaled before the DRM: Grounding DINO reads at most ~1333 px and CLIP
    224-336 px, so a x4 clean estimate of more than 512 input pixels buys nothing."""
    scene_words: int = 3
    caption_hint_mode: Literal["scene", "full"] = "scene"
    trained: bool = False
    """Whether the weights are real (published) ones; the tiny demo's are random and labelled so."""
    drm_trained: bool = False
    """Whether the DRM alone has real weights (the demo grounder: the trained Real-ESRGAN x4plus
    RRDBNet, while its tagger and detector are random, so ``trained`` stays false)."""
    drm_weights: str = ""
    """What the DRM's weights are, ``<name>: <description>`` (e.g. ``realesrgan-x4plus: ...``)."""
    masks: bool = False
    """Run the SAM masker on the boxes (needs a ``sam`` component)."""
    mask_grid: int = 64
    """Longest side of the stored masks' grid."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GrounderConfig:
        data = dict(data)
        return cls(
            tagger=TaggerSettings(**data.pop("tagger", {})),
            detector=DetectorSettings(**data.pop("detector", {})),
            caption=CaptionThresholds(**data.pop("caption", {})),
            **data,
        )


class SpaSemSRGrounder:
    """DRM -> CLIP tagger -> Grounding DINO -> degradation-aware caption (see module docstring)."""

    config_name = "grounder_config.json"

    def __init__(
        self,
        *,
        drm: RRDBNet | None,
        tagger: ClipTagger,
        detector: GroundingDinoDetector,
        captioner: Captioner | None = None,
        masker: BoxMasker | None = None,
        config: GrounderConfig | None = None,
    ) -> None:
        self.drm = frozen(drm) if drm is not None else None
        self.tagger = tagger
        self.detector = detector
        self.masker = masker
        self.config = config or GrounderConfig()
        self.captioner = captioner or TemplateCaptioner(self.config.caption)
        if self.config.masks and masker is None:
            raise ValueError("the grounder config asks for masks but no SAM masker was given")

    # ------------------------------------------------------------------ inference

    def check_inputs(
        self, image: Image.Image, tags_hint: tuple[str, ...], caption_hint: str | None
    ) -> None:
        if not isinstance(image, Image.Image):
            raise ValueError(f"image must be a PIL image, got {type(image).__name__}")
        if image.width < 1 or image.height < 1:
            raise ValueError(f"image must not be empty, got {image.width}x{image.height}")
        if len(tags_hint) > MAX_HINT_TAGS:
            raise ValueError(f"at most {MAX_HINT_TAGS} hint tags, got {len(tags_hint)}")
        for tag in tags_hint:
            if not isinstance(tag, str) or not tag.strip() or len(tag) > MAX_TAG_CHARS:
                raise ValueError(f"hint tags must be non-empty strings of <= {MAX_TAG_CHARS} chars")
        if caption_hint is not None and len(caption_hint) > MAX_CAPTION_CHARS:
            raise ValueError(f"caption hint longer than {MAX_CAPTION_CHARS} characters")

    @torch.no_grad()
    def remove_degradations(self, image: Image.Image) -> Image.Image:
        """The DRM's clean estimate of ``image`` (the image itself when there is no DRM)."""
        if self.drm is None:
            return image
        limit = self.config.drm_max_side
        if limit is not None and max(image.size) > limit:
            factor = limit / max(image.size)
            size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
            image = image.resize(size, Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1)[None]
        tensor = tensor.to(device_of(self.drm), dtype_of(self.drm))
        output = tiled_forward(
            self.drm, tensor, tile=self.config.drm_tile, overlap=self.config.drm_overlap
        )
        clean = output[0].float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(clean)

    def ground(
        self,
        image: Image.Image,
        *,
        tags_hint: tuple[str, ...] = (),
        caption_hint: str | None = None,
    ) -> GroundingResult:
        """Tags with one box per instance, the caption and estimates; timed per stage."""
        tags_hint = tuple(tags_hint)
        self.check_inputs(image, tags_hint, caption_hint)
        timings: dict[str, float] = {}
        lr = image.convert("RGB")

        # 1. DRM: the clean estimate the grounding models read.
        started = time.perf_counter()
        clean = self.remove_degradations(lr)
        timings["drm"] = time.perf_counter() - started

        # 2. Tagger: object tags (user hints first) and the best scene tag.
        started = time.perf_counter()
        scores = self.tagger.tag(clean, settings=self.config.tagger)
        hints = tuple(t.strip().lower() for t in tags_hint)
        tags = merge_tags(hints, [t for t, _ in scores.objects], limit=self.config.tagger.top_k)
        timings["tagger"] = time.perf_counter() - started

        # 3. Detector: one box per instance, then whole-image boxes for hints left without one.
        started = time.perf_counter()
        detections = self.detector.detect(clean, tags, settings=self.config.detector)
        pairs = self._tags_and_boxes(tags, hints, detections)
        timings["detector"] = time.perf_counter() - started

        # 4. Masks (optional): SAM on the same clean estimate, one box prompt per box.
        masks: tuple[Mask, ...] = ()
        if self.config.masks and self.masker is not None:
            started = time.perf_counter()
            masks = self.masker.masks(clean, [b for _, b in pairs], grid=self.config.mask_grid)
            timings[MASK_STAGE] = time.perf_counter() - started

        # 5. Caption: measured on the LR input, worded around the scene.
        started = time.perf_counter()
        estimates = estimate_degradations(lr)
        scene = (
            scores.scene[0][0]
            if scores.scene
            else scene_phrase([t for t, _ in pairs], max_words=self.config.scene_words)
        )
        if (
            caption_hint is not None
            and caption_hint.strip()
            and self.config.caption_hint_mode == "full"
        ):
            caption = caption_hint.strip()
        else:
            if caption_hint is not None and caption_hint.strip():
                scene = caption_hint.strip().rstrip(".")
            caption = self.captioner.caption(clean, estimates=estimates, scene=scene)
        timings["caption"] = time.perf_counter() - started

        prompt = GroundedPrompt(
            tags=tuple(t for t, _ in pairs),
            boxes=tuple(b for _, b in pairs),
            caption=caption,
            estimates=estimates.as_dict(),
            masks=masks,
        )
        logger.debug("grounded %d boxes in %.3fs", len(pairs), sum(timings.values()))
        return GroundingResult(prompt=prompt, timings=timings)

    @staticmethod
    def _tags_and_boxes(
        tags: tuple[str, ...], hints: tuple[str, ...], detections: list[Detection]
    ) -> list[tuple[str, Box]]:
        """Detections grouped by tag order (hints first), best first within a tag."""
        order = {tag: index for index, tag in enumerate(tags)}
        ranked = sorted(detections, key=lambda d: (order.get(d.tag, len(order)), -d.score))
        pairs = [(d.tag, d.box) for d in ranked]
        found = {d.tag for d in detections}
        missing = [(tag, WHOLE_IMAGE) for tag in hints if tag not in found]
        # Whole-image boxes sit where the tag would have been, so hint order is kept.
        return sorted(missing + pairs, key=lambda pair: order.get(pair[0], len(order)))

    def warm_up(self) -> None:
        """Encode the tag vocabulary and run every stage once on a small image."""
        self.tagger.text_embeddings()
        self.ground(Image.new("RGB", (32, 32), (127, 127, 127)))

    # ------------------------------------------------------------------ persistence

    def with_config(self, **changes: Any) -> SpaSemSRGrounder:
        """The same models with some settings replaced (e.g. ``caption_hint_mode="full"``)."""
        return SpaSemSRGrounder(
            drm=self.drm,
            tagger=self.tagger,
            detector=self.detector,
            captioner=self.captioner,
            masker=self.masker,
            config=replace(self.config, **changes),
        )

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        components: dict[str, str | None] = {
            "drm": None,
            "tagger": "tagger",
            "detector": "detector",
        }
        if self.drm is not None:
            self.drm.save_pretrained(directory / "drm")
            components["drm"] = "drm"
        for name, part in (("tagger", self.tagger), ("detector", self.detector)):
            part.model.save_pretrained(directory / name)
            part.tokenizer.save_pretrained(directory / name)
            part.image_processor.save_pretrained(directory / name)
        captioner = None
        if isinstance(self.captioner, BlipCaptioner):
            self.captioner.save_pretrained(directory / "captioner")
            captioner = "captioner"
        components["captioner"] = captioner
        components["sam"] = None
        if self.masker is not None:
            self.masker.save_pretrained(directory / "sam")
            components["sam"] = "sam"
        self.tagger.vocabulary.save(directory / "vocabulary.txt")
        document = {"config": self.config.to_dict(), "components": components}
        (directory / self.config_name).write_text(json.dumps(document, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> SpaSemSRGrounder:
        """Load a folder written by :meth:`save_pretrained` (or assembled by hand: module doc)."""
        directory = Path(directory)
        document = json.loads((directory / cls.config_name).read_text())
        config = GrounderConfig.from_dict(document.get("config", {}))
        components: dict[str, str | None] = document.get("components", {})
        vocabulary_file = directory / "vocabulary.txt"
        vocabulary = (
            TagVocabulary.from_file(vocabulary_file)
            if vocabulary_file.is_file()
            else TagVocabulary.default()
        )

        drm: RRDBNet | None = None
        drm_source = _resolve(directory, components.get("drm"))
        if isinstance(drm_source, Path) and drm_source.is_file():
            drm = RRDBNet.from_published_checkpoint(drm_source, device=device, dtype=dtype)
        elif drm_source is not None:
            drm = frozen(RRDBNet.from_pretrained(drm_source, torch_dtype=dtype), device)

        tagger_source = _require(directory, components, "tagger")
        tagger = ClipTagger(
            frozen(CLIPModel.from_pretrained(tagger_source, dtype=dtype), device),
            AutoTokenizer.from_pretrained(tagger_source),
            CLIPImageProcessorPil.from_pretrained(tagger_source),
            vocabulary,
            config.tagger,
        )
        detector_source = _require(directory, components, "detector")
        detector = GroundingDinoDetector(
            frozen(
                GroundingDinoForObjectDetection.from_pretrained(detector_source, dtype=dtype),
                device,
            ),
            AutoTokenizer.from_pretrained(detector_source),
            GroundingDinoImageProcessorPil.from_pretrained(detector_source),
            config.detector,
        )
        captioner: Captioner | None = None
        captioner_source = _resolve(directory, components.get("captioner"))
        if captioner_source is not None:
            captioner = BlipCaptioner.from_pretrained(
                captioner_source, thresholds=config.caption, device=device, dtype=dtype
            )
        masker: BoxMasker | None = None
        sam_source = _resolve(directory, components.get("sam"))
        if sam_source is not None:
            masker = BoxMasker.from_pretrained(
                sam_source, grid=config.mask_grid, device=device, dtype=dtype
            )
        elif config.masks:
            raise ValueError(f"{directory / cls.config_name} sets masks but names no sam component")
        return cls(
            drm=drm,
            tagger=tagger,
            detector=detector,
            captioner=captioner,
            masker=masker,
            config=config,
        )


def _resolve(directory: Path, entry: str | None) -> Path | str | None:
    """A component entry as a local path if one exists (folder-relative first), else a hub id."""
    if entry is None:
        return None
    for candidate in (directory / entry, Path(entry)):
        if candidate.exists():
            return candidate
    return entry


def _require(directory: Path, components: dict[str, str | None], name: str) -> Path | str:
    source = _resolve(directory, components.get(name, name))
    if source is None:
        raise ValueError(f"{directory / SpaSemSRGrounder.config_name} names no {name} component")
    return source
