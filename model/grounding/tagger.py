"""Open-vocabulary tags for the clean estimate: CLIP zero-shot scores over a shipped vocabulary.

The paper's Grounded-SAM takes its tags from RAM (DESIGN 1.3), which transformers does not carry.
Ours scores every tag of a vocabulary with CLIP (Radford et al. 2021, zero-shot classification,
Sec. 3.1.2): ``softmax(logit_scale * cos(image, "a photo of a <tag>."))``, keeping the top-k
above a threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPModel, PreTrainedTokenizerBase

from .modules import device_of, dtype_of, frozen

logger = logging.getLogger(__name__)

SCENE_SECTION = "scene"
DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class TagVocabulary:
    """Tags in file order, each with its section (``scene``, ``object``, ``material`` or ``""``)."""

    tags: tuple[str, ...]
    sections: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.tags:
            raise ValueError("a tag vocabulary needs at least one tag")
        if self.sections and len(self.sections) != len(self.tags):
            raise ValueError(f"{len(self.tags)} tags but {len(self.sections)} sections")
        if len(set(self.tags)) != len(self.tags):
            raise ValueError("tags in a vocabulary must be unique")

    def section_of(self, tag: str) -> str:
        return self.sections[self.tags.index(tag)] if self.sections else ""

    @property
    def scene_tags(self) -> frozenset[str]:
        return frozenset(
            t for t, s in zip(self.tags, self.sections, strict=False) if s == SCENE_SECTION
        )

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> TagVocabulary:
        """Parse the ``vocabulary.txt`` format: one tag per line, ``# name`` starts a section.

        Header comments before the first one-word ``# section`` line are ignored; tags are
        lower-cased and de-duplicated (first occurrence wins).
        """
        tags: dict[str, str] = {}
        section = ""
        for raw in lines:
            line = raw.strip()
            if not line:
                continue
            if line.startswith("#"):
                name = line.lstrip("#").strip()
                if name and " " not in name:
                    section = name.lower()
                continue
            tags.setdefault(line.lower(), section)
        return cls(tuple(tags), tuple(tags.values()))

    @classmethod
    def from_file(cls, path: str | Path) -> TagVocabulary:
        return cls.from_lines(Path(path).read_text(encoding="utf-8").splitlines())

    @classmethod
    def default(cls) -> TagVocabulary:
        """The vocabulary shipped with the project (``model/grounding/vocabulary.txt``)."""
        text = resources.files("model.grounding").joinpath("vocabulary.txt").read_text("utf-8")
        return cls.from_lines(text.splitlines())

    def save(self, path: str | Path) -> None:
        lines: list[str] = []
        current: str | None = None
        for tag, section in zip(self.tags, self.sections or ("",) * len(self.tags), strict=True):
            if section != current and section:
                lines.append(f"# {section}")
            current = section
            lines.append(tag)
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


@dataclass(frozen=True, kw_only=True)
class TaggerSettings:
    top_k: int = 8
    """At most this many object tags go to the detector."""
    threshold: float = 0.01
    """Minimum softmax probability over the whole vocabulary for a tag to be kept."""
    min_tags: int = 1
    """Always keep this many best tags, even under the threshold (empty prompts ground nothing)."""
    template: str = DEFAULT_TEMPLATE
    batch_size: int = 64


@dataclass(frozen=True)
class TagScores:
    """Tagger output: kept object tags and the best scene tag, with their probabilities."""

    objects: tuple[tuple[str, float], ...]
    scene: tuple[tuple[str, float], ...] = field(default=())


class ClipTagger:
    """CLIP zero-shot tagger. Tag text embeddings are computed once and kept."""

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: CLIPImageProcessorPil,
        vocabulary: TagVocabulary,
        settings: TaggerSettings | None = None,
    ) -> None:
        self.model = frozen(model)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.vocabulary = vocabulary
        self.settings = settings or TaggerSettings()
        self._text_embeddings: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return device_of(self.model)

    @torch.no_grad()
    def text_embeddings(self) -> torch.Tensor:
        """Unit-norm text embeddings ``(num_tags, dim)`` of the prompt template for every tag."""
        if self._text_embeddings is None:
            prompts = [self.settings.template.format(tag) for tag in self.vocabulary.tags]
            chunks = []
            for start in range(0, len(prompts), self.settings.batch_size):
                batch = self.tokenizer(
                    prompts[start : start + self.settings.batch_size],
                    padding=True,
                    truncation=True,
                    return_tensors="pt",
                ).to(self.device)
                features = self.model.get_text_features(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).pooler_output
                chunks.append(torch.nn.functional.normalize(features.float(), dim=-1))
            self._text_embeddings = torch.cat(chunks)
            logger.info("encoded a tag vocabulary of %d tags", len(prompts))
        return self._text_embeddings

    @torch.no_grad()
    def probabilities(self, image: Image.Image) -> torch.Tensor:
        """Softmax over the vocabulary of CLIP's scaled cosine similarity, ``(num_tags,)``."""
        text = self.text_embeddings()
        pixels = self.image_processor(images=image.convert("RGB"), return_tensors="pt")[
            "pixel_values"
        ]
        dtype = dtype_of(self.model)
        features = self.model.get_image_features(
            pixel_values=pixels.to(self.device, dtype)
        ).pooler_output
        image_embedding = torch.nn.functional.normalize(features.float(), dim=-1)[0]
        logits = self.model.logit_scale.exp().float() * (text @ image_embedding)
        return torch.softmax(logits, dim=-1).cpu()

    def tag(self, image: Image.Image, *, settings: TaggerSettings | None = None) -> TagScores:
        """Object tags (top-k over the threshold, at least ``min_tags``) and the best scene tag.

        ``settings`` overrides the tagger's own for this call (the prompt template is fixed at
        construction, since the tag embeddings are cached).
        """
        settings = settings or self.settings
        probs = self.probabilities(image)
        scene_tags = self.vocabulary.scene_tags
        order = torch.argsort(probs, descending=True, stable=True).tolist()
        objects: list[tuple[str, float]] = []
        scene: list[tuple[str, float]] = []
        for index in order:
            tag, score = self.vocabulary.tags[index], float(probs[index])
            if tag in scene_tags:
                if not scene:
                    scene.append((tag, score))
                continue
            keep = score >= settings.threshold or len(objects) < settings.min_tags
            if keep and len(objects) < settings.top_k:
                objects.append((tag, score))
        return TagScores(tuple(objects), tuple(scene))


def merge_tags(hint: Sequence[str], tagged: Sequence[str], *, limit: int) -> tuple[str, ...]:
    """User tags first (always kept), then new tagger tags, up to ``limit`` tags in all."""
    merged = list(dict.fromkeys(t.strip().lower() for t in hint if t.strip()))
    for tag in tagged:
        if len(merged) >= max(limit, len(hint)):
            break
        if tag not in merged:
            merged.append(tag)
    return tuple(merged)
