"""Spatial-aware and degradation-aware text (arXiv 2603.14112, Fig. 2a; DESIGN 1.2 steps 3-4).

* Spatial-aware text ``T_spa``: the tags ``{sky, water, sand, cliff}`` go through the frozen text
  encoder as one prompt ``"sky, water, sand, cliff"``; every token of tag ``i`` (all its sub-word
  tokens, found through the tokenizer's character offsets) gets the position embedding of box
  ``i`` added (the "aligned token add", the circled plus of Fig. 2a). Other tokens are untouched.
* Degradation-aware text ``T_deg``: the caption goes through the same frozen text encoder.

The box embedding is added at the scale of the tokens it lands on, not at its own [I]: the
Fourier features have norm ``sqrt(D / 2)`` whatever the encoder (22.6 at SD2's 1024-d width, 4
at the tiny 32-d one), while a token's norm is whatever the encoder's final LayerNorm gains
make it (about ``sqrt(D)`` at unit gains). Added raw, the box would outweigh the tag's meaning
in one encoder and vanish in another; rescaled to the mean norm of the tag's own tokens, the
sum carries what and where in equal measure in every encoder. The paper gives no scale.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import CLIPTextModel, PreTrainedTokenizerBase

from model.blocks.position import FourierPositionEncoder
from model.pipeline.prompt import Box, GroundedPrompt

logger = logging.getLogger(__name__)

DEFAULT_NEGATIVE_PROMPT = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed"
"""SeeSR's negative prompt, DESIGN 1.2 step 8 [I]."""

TAG_SEPARATOR = ", "
WHOLE_IMAGE: Box = (0.0, 0.0, 1.0, 1.0)


def compose_caption(tags: Sequence[str] = ()) -> str:
    """A generic degradation-aware caption in the style of Fig. 2a, naming the scene when tags are
    known."""
    scene = list(dict.fromkeys(tag for tag in tags if tag))
    subject = f" of {', '.join(scene)}" if scene else ""
    return (
        f"A low-resolution image{subject}. "
        "The image exhibits blurred details, noise and compression artifacts."
    )


def default_prompt(
    *, tags_hint: Sequence[str] = (), caption_hint: str | None = None
) -> GroundedPrompt:
    """The grounded prompt used when neither a request nor a grounder supplies one.

    Hinted tags are not localised, so each gets the whole-image box; the caption is the hint or
    :func:`compose_caption`.
    """
    tags = tuple(tag.strip() for tag in tags_hint if tag.strip())
    caption = (
        caption_hint.strip() if caption_hint and caption_hint.strip() else compose_caption(tags)
    )
    return GroundedPrompt(tags=tags, boxes=(WHOLE_IMAGE,) * len(tags), caption=caption)


def tag_prompt(tags: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Join tags into one prompt; return it with each tag's ``[start, end)`` character span."""
    spans: list[tuple[int, int]] = []
    text = ""
    for index, tag in enumerate(tags):
        if index:
            text += TAG_SEPARATOR
        spans.append((len(text), len(text) + len(tag)))
        text += tag
    return text, spans


def tag_token_indices(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[list[int]]:
    """For each tag span, the indices of the tokens whose characters lie inside it.

    Special and padding tokens have empty offsets ``(0, 0)`` and never match.
    """
    return [
        [j for j, (a, b) in enumerate(offsets) if b > a and a >= start and b <= end]
        for start, end in spans
    ]


def aligned_token_add(
    embeddings: torch.Tensor, token_indices: Sequence[Sequence[int]], box_embeddings: torch.Tensor
) -> torch.Tensor:
    """The aligned token add of Fig. 2a: ``T_spa[j] = T[j] + P(box_i)`` for every token ``j`` of tag
    ``i``.

    ``embeddings`` is ``(..., L, D)``, ``box_embeddings`` is ``(num_tags, D)`` or, one set per
    sequence, ``(..., num_tags, D)``; returns a new tensor.
    """
    if len(token_indices) != box_embeddings.shape[-2]:
        raise ValueError(f"{len(token_indices)} tags but {box_embeddings.shape[-2]} box embeddings")
    out = embeddings.clone()
    for index, indices in enumerate(token_indices):
        if indices:
            box_embedding = box_embeddings[..., index, :].unsqueeze(-2)
            out[..., list(indices), :] += box_embedding.to(out.dtype)
    return out


def box_embeddings_at_token_scale(
    embeddings: torch.Tensor, token_indices: Sequence[Sequence[int]], box_embeddings: torch.Tensor
) -> torch.Tensor:
    """Each box embedding rescaled to the mean norm of its tag's tokens (module docstring).

    ``embeddings`` is ``(..., L, D)``, ``box_embeddings`` ``(num_tags, D)``; returns
    ``(..., num_tags, D)``, one set per sequence. A tag without tokens gets zeros (nothing is
    added to it anyway).
    """
    directions = box_embeddings / box_embeddings.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    scaled = []
    for index, indices in enumerate(token_indices):
        if indices:
            scale = embeddings[..., list(indices), :].float().norm(dim=-1).mean(dim=-1)
        else:
            scale = embeddings.new_zeros(embeddings.shape[:-2], dtype=torch.float32)
        scaled.append(scale[..., None] * directions[index].float())
    if not scaled:
        return embeddings.new_zeros(*embeddings.shape[:-2], 0, embeddings.shape[-1])
    return torch.stack(scaled, dim=-2)


class TextConditioner:
    """Encodes captions (``T_deg``, negative prompt) and tags with boxes (``T_spa``) with one frozen
    encoder."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, text_encoder: CLIPTextModel) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.position_encoder = FourierPositionEncoder(text_encoder.config.hidden_size)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def _tokenize(self, text: str | list[str], *, offsets: bool = False):  # type: ignore[no-untyped-def]
        return self.tokenizer(
            text,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_offsets_mapping=offsets,
            return_tensors="pt",
        )

    def _encode_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.to(self.text_encoder.device)
        hidden: torch.Tensor = self.text_encoder(input_ids=input_ids)[0]
        return hidden

    @torch.no_grad()
    def encode(self, text: str) -> torch.Tensor:
        """``(1, L, D)`` token embeddings of one text, truncated to the encoder's length."""
        return self._encode_ids(self._tokenize(text).input_ids)

    @torch.no_grad()
    def encode_many(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, L, D)``: :meth:`encode` of each text, in one pass of the encoder (every text is
        padded to the same length, so the batch changes nothing but the speed)."""
        return self._encode_ids(self._tokenize(list(texts)).input_ids)

    def fit_tags(self, tags: Sequence[str], boxes: Sequence[Box]) -> tuple[list[str], list[Box]]:
        """Drop trailing tags (and their boxes) that do not fit in the encoder's token window."""
        kept_tags, kept_boxes = list(tags), list(boxes)
        budget = self.max_length - 2  # start and end tokens
        while kept_tags:
            text, _ = tag_prompt(kept_tags)
            if (
                len(self.tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
                <= budget
            ):
                break
            kept_tags.pop()
            kept_boxes.pop()
        if len(kept_tags) < len(tags):
            logger.info(
                "spatial text: kept %d of %d tags within %d tokens",
                len(kept_tags),
                len(tags),
                budget,
            )
        return kept_tags, kept_boxes

    @torch.no_grad()
    def encode_tags(self, tags: Sequence[str]) -> tuple[torch.Tensor, list[list[int]]]:
        """The tag prompt through the encoder, ``(1, L, D)``, and each tag's token indices."""
        text, spans = tag_prompt(tags)
        encoding = self._tokenize(text, offsets=True)
        offsets = [tuple(pair) for pair in encoding.offset_mapping[0].tolist()]
        return self._encode_ids(encoding.input_ids), tag_token_indices(offsets, spans)

    @torch.no_grad()
    def encode_spatial(
        self,
        tags: Sequence[str],
        boxes: Sequence[Box],
        *,
        cache: dict[tuple[str, ...], tuple[torch.Tensor, list[list[int]]]] | None = None,
    ) -> torch.Tensor:
        """``T_spa``, ``(1, L, D)``: the tag prompt through the encoder, each tag's tokens plus its
        box embedding.

        ``cache`` (per image) keeps tag-prompt encodings, so tiles with the same tags but other
        boxes only redo the aligned token add.
        """
        return self.encode_spatial_and_tags(tags, boxes, cache=cache)[0]

    @torch.no_grad()
    def encode_spatial_and_tags(
        self,
        tags: Sequence[str],
        boxes: Sequence[Box],
        *,
        cache: dict[tuple[str, ...], tuple[torch.Tensor, list[list[int]]]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T_spa, T_tags)``, each ``(1, L, D)``: :meth:`encode_spatial` and the same tag prompt
        without the box embeddings (the semantic prompt the frozen UNet reads), from one encoder
        pass."""
        kept_tags, kept_boxes = self.fit_tags(tags, boxes)
        key = tuple(kept_tags)
        if cache is not None and key in cache:
            embeddings, indices = cache[key]
        else:
            embeddings, indices = self.encode_tags(kept_tags)
            if cache is not None:
                cache[key] = (embeddings, indices)
        if not kept_tags:
            return embeddings, embeddings
        box_tensor = torch.tensor(kept_boxes, dtype=torch.float32, device=embeddings.device)
        boxes_embedded = self.position_encoder.to(embeddings.device)(box_tensor)
        spatial = aligned_token_add(
            embeddings, indices, box_embeddings_at_token_scale(embeddings, indices, boxes_embedded)
        )
        return spatial, embeddings
