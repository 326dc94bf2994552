"""Tiny seeded configurations of the grounding models, for tests and the embedded demo.

The demo grounder (:func:`ensure_demo_grounder`) has one trained part: its DRM is the official
Real-ESRGAN x4plus RRDBNet (Wang et al. 2021), as the paper's DRM is an RRDBNet. Tests that build
tiny grounders keep the seeded toy DRM (``drm="tiny"``, the default of
:func:`build_tiny_grounder`).

No machine here reaches a model hub (DESIGN 1.6), so the tiny grounder is built from the real
classes (RRDBNet, transformers' ``CLIPModel`` and ``GroundingDinoForObjectDetection``) at toy sizes
with seeded random weights, tokenizers written by the project, then saved and loaded back through
the same ``from_pretrained`` code as real weights. Its tags and boxes are meaningless; its
degradation estimates and caption are real measurements.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    BertConfig,
    BertTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTextConfig,
    CLIPTokenizer,
    CLIPVisionConfig,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessorPil,
    SamConfig,
    SamImageProcessorPil,
    SamMaskDecoderConfig,
    SamModel,
    SamPromptEncoderConfig,
    SamVisionConfig,
    SwinConfig,
)

from model.configs.tiny_tokenizer import load_tiny_clip_tokenizer, write_tiny_clip_tokenizer
from model.grounding.detector import GroundingDinoDetector
from model.grounding.drm import RRDBNet
from model.grounding.grounder import GrounderConfig, SpaSemSRGrounder
from model.grounding.masks import BoxMasker, make_sam_processor
from model.grounding.modules import frozen
from model.grounding.tagger import ClipTagger, TagVocabulary

logger = logging.getLogger(__name__)

TINY_IMAGE_SIDE = 32
"""CLIP input side of the tiny tagger."""
TINY_DETECTOR_SIDE = 64
"""Shortest side the tiny detector's image processor resizes to."""
TINY_SAM_SIDE = 64
"""Input side of the tiny SAM (the real one reads 1024 px)."""
#  Grounding DINO builds its sub-sentence attention masks from BERT's ids of [CLS], [SEP], "." and
# "?" (transformers' SPECIAL_TOKENS), so a home-made vocabulary must put those tokens at those ids.
_BERT_FIXED_IDS = {
    "[PAD]": 0,
    "[UNK]": 100,
    "[CLS]": 101,
    "[SEP]": 102,
    "[MASK]": 103,
    ".": 1012,
    "?": 1029,
}
_PUNCTUATION = "!\"#$%&'()*+,-/:;<=>@[\\]^_`{|}~"


def bert_vocabulary(words: list[str]) -> list[str]:
    """A WordPiece vocabulary in BERT's id layout: specials, characters, ``##`` pieces, words."""
    pieces: list[str] = []
    characters = "abcdefghijklmnopqrstuvwxyz0123456789"
    pieces += list(characters) + list(_PUNCTUATION) + [f"##{c}" for c in characters]
    for phrase in words:
        for word in phrase.lower().replace("-", " ").split():
            pieces.append(word)
    free = [p for p in dict.fromkeys(pieces) if p not in _BERT_FIXED_IDS]
    size = max(max(_BERT_FIXED_IDS.values()) + 1, len(free) + len(_BERT_FIXED_IDS))
    tokens: list[str | None] = [None] * size
    for token, index in _BERT_FIXED_IDS.items():
        tokens[index] = token
    # Ids 1..99 stay BERT's [unusedN] slots; the rest fill from 104 upwards around the fixed ids.
    free_slots = (i for i in range(104, size) if tokens[i] is None)
    for piece, slot in zip(free, free_slots, strict=False):
        tokens[slot] = piece
    return [token if token is not None else f"[unused{i}]" for i, token in enumerate(tokens)]


def write_tiny_bert_tokenizer(directory: Path, words: list[str]) -> Path:
    """Write ``vocab.txt`` and the tokenizer files of a lower-casing WordPiece tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(bert_vocabulary(words)) + "\n", encoding="utf-8")
    BertTokenizer(vocab=str(vocab_file), do_lower_case=True).save_pretrained(directory)
    return directory


def tiny_clip(vocab_size: int, *, bos: int, eos: int, pad: int) -> CLIPModel:
    text = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=16,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    vision = CLIPVisionConfig(
        image_size=TINY_IMAGE_SIDE,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=16,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    return frozen(CLIPModel(config))


def tiny_grounding_dino(vocab_size: int) -> GroundingDinoForObjectDetection:
    # out_indices is a constructor argument that the strict config type does not declare.
    swin: dict[str, Any] = dict(
        image_size=TINY_DETECTOR_SIDE,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_indices=[2, 3, 4],
    )
    backbone = SwinConfig(**swin)
    text = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        d_model=32,
        encoder_layers=1,
        # Two decoder layers: transformers ties every layer's box head to the first one.
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=20,
        # Three levels (the Swin stages): a fourth, strided level would be 1x1 at this size and
        # GroupNorm over one value per channel is undefined.
        num_feature_levels=3,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=64,
    )
    return frozen(GroundingDinoForObjectDetection(config))


def tiny_sam() -> SamModel:
    """SAM at toy size: an 8x8 image embedding, so 32x32 low-resolution masks."""
    vision = SamVisionConfig(
        hidden_size=16,
        output_channels=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_SAM_SIDE,
        patch_size=8,
        window_size=4,
        global_attn_indexes=[1],
        num_pos_feats=8,
        mlp_dim=32,
    )
    prompt = SamPromptEncoderConfig(
        hidden_size=16, image_size=TINY_SAM_SIDE, patch_size=8, mask_input_channels=4
    )
    decoder = SamMaskDecoderConfig(
        hidden_size=16,
        mlp_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        iou_head_hidden_dim=16,
    )
    config = SamConfig(
        vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder
    )
    return frozen(SamModel(config))


def build_tiny_box_masker(seed: int = 0, *, grid: int = 64) -> BoxMasker:
    """The tiny SAM masker: random weights, so its masks are arbitrary but deterministic."""
    torch.manual_seed(seed)
    side = TINY_SAM_SIDE
    image_processor = SamImageProcessorPil(
        size={"longest_edge": side},
        pad_size={"height": side, "width": side},
        mask_size={"longest_edge": side // 4},
        mask_pad_size={"height": side // 4, "width": side // 4},
    )
    return BoxMasker(tiny_sam(), make_sam_processor(image_processor), grid=grid)


def project_tokenizers(vocabulary: TagVocabulary) -> tuple[CLIPTokenizer, BertTokenizer]:
    """CLIP BPE and BERT WordPiece tokenizers written from the tag vocabulary, loaded back."""
    words = [*vocabulary.tags, "a", "photo", "of", "an", "image"]
    with tempfile.TemporaryDirectory() as scratch:
        clip_tokenizer = load_tiny_clip_tokenizer(
            write_tiny_clip_tokenizer(Path(scratch) / "clip", words=words, num_merges=300)
        )
        bert_tokenizer = BertTokenizer.from_pretrained(
            write_tiny_bert_tokenizer(Path(scratch) / "bert", words)
        )
    return clip_tokenizer, bert_tokenizer


DrmChoice = Literal["realesrgan-x4plus", "tiny"]
DEMO_DRM: DrmChoice = "realesrgan-x4plus"
"""The DRM of the demo grounder: the paper's DRM is an RRDBNet, and Real-ESRGAN x4plus is the
trained one every installation has (``model.upscalers.realesrgan``, converted once from the ncnn
files)."""
TINY_DRM_WEIGHTS = "tiny: a seeded random RRDBNet (8 features, 1 block)"


def trained_drm(cache_root: Path) -> tuple[RRDBNet, str]:
    """The converted Real-ESRGAN x4plus RRDBNet and the description of its weights."""
    # Imported here: model.upscalers.realesrgan imports model.grounding.drm.
    from model.upscalers.realesrgan.catalogue import ensure_converted, load_network, published

    folder = ensure_converted(DEMO_DRM, cache_root)
    network = load_network(folder)
    if not isinstance(network, RRDBNet):
        raise ValueError(f"{folder} does not hold an RRDBNet")
    entry = published(DEMO_DRM)
    return network, f"{DEMO_DRM}: {entry.source}, licence {entry.licence}"


def demo_drm_config(**settings: Any) -> GrounderConfig:
    """Grounder settings for the x4plus DRM: inputs are first brought to at most 128 px (the
    toy tagger reads 32 px and the toy detector at most 128, so a 512-px clean estimate is
    plenty) and run as one tile; 32 px of context if a caller raises the limit (the 23-block
    net's effective reach is wide, see ``model.upscalers.realesrgan.upscaler.RRDBNET_OVERLAP``)."""
    return GrounderConfig(drm_tile=128, drm_overlap=32, drm_max_side=128, **settings)


def build_tiny_grounder(
    seed: int = 0,
    *,
    masks: bool = False,
    drm: DrmChoice = "tiny",
    cache_root: Path | None = None,
) -> SpaSemSRGrounder:
    """The tiny grounder: every real class at toy size, seeded, tokenizers written locally.

    ``masks=True`` adds the tiny SAM masker and turns the flag on (built after the rest, so the
    other components' weights are the same either way). ``drm="realesrgan-x4plus"`` swaps the
    toy DRM for the trained Real-ESRGAN x4plus, converted into ``cache_root`` on first use; the
    grounder stays ``trained=False`` (its tagger and detector are random) with ``drm_trained``.
    """
    torch.manual_seed(seed)
    vocabulary = TagVocabulary.default()
    # Built in every case so that the random weights of the other components do not depend on
    # the DRM choice.
    drm_model = frozen(RRDBNet(num_features=8, num_blocks=1, growth_channels=4, scale=4))
    clip_tokenizer, bert_tokenizer = project_tokenizers(vocabulary)
    clip = tiny_clip(
        len(clip_tokenizer),
        bos=int(clip_tokenizer.bos_token_id),
        eos=int(clip_tokenizer.eos_token_id),
        pad=int(clip_tokenizer.pad_token_id),
    )
    clip_processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIDE},
        crop_size={"height": TINY_IMAGE_SIDE, "width": TINY_IMAGE_SIDE},
    )
    dino = tiny_grounding_dino(len(bert_tokenizer))
    dino_processor = GroundingDinoImageProcessorPil(
        size={"shortest_edge": TINY_DETECTOR_SIDE, "longest_edge": 2 * TINY_DETECTOR_SIDE}
    )
    tagger = ClipTagger(clip, clip_tokenizer, clip_processor, vocabulary)
    detector = GroundingDinoDetector(dino, bert_tokenizer, dino_processor)
    masker = build_tiny_box_masker(seed, grid=GrounderConfig().mask_grid) if masks else None
    if drm == "tiny":
        # One RRDB block: a receptive radius under 24 input pixels, so 24 of overlap make tiles
        # exact.
        config = GrounderConfig(
            drm_tile=128, drm_overlap=24, trained=False, masks=masks, drm_weights=TINY_DRM_WEIGHTS
        )
    elif drm == DEMO_DRM:
        if cache_root is None:
            raise ValueError(f"drm={drm!r} needs a cache_root to convert the weights into")
        drm_model, description = trained_drm(cache_root)
        config = demo_drm_config(
            trained=False, masks=masks, drm_trained=True, drm_weights=description
        )
    else:
        raise ValueError(f"drm must be 'tiny' or {DEMO_DRM!r}, got {drm!r}")
    return SpaSemSRGrounder(
        drm=drm_model, tagger=tagger, detector=detector, masker=masker, config=config
    )


def build_full_size_grounder(seed: int = 0) -> SpaSemSRGrounder:
    """Published shapes with random weights, for benchmarks: RRDBNet 23 blocks x4 (BSRNet /
    RealESRNet), CLIP ViT-L/14 at 224 px, Grounding DINO tiny (Swin-T + BERT-base, 900 queries).

    The tokenizers are the project's small ones (ids fit the full vocabularies); token counts per
    tag are close to the real ones, so the text side costs about the same.
    """
    torch.manual_seed(seed)
    vocabulary = TagVocabulary.default()
    clip_tokenizer, bert_tokenizer = project_tokenizers(vocabulary)
    text = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        projection_dim=768,
        bos_token_id=int(clip_tokenizer.bos_token_id),
        eos_token_id=int(clip_tokenizer.eos_token_id),
        pad_token_id=int(clip_tokenizer.pad_token_id),
    )
    vision = CLIPVisionConfig(
        image_size=224,
        patch_size=14,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        projection_dim=768,
    )
    clip = frozen(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)))
    dino = frozen(
        GroundingDinoForObjectDetection(
            GroundingDinoConfig(text_config=BertConfig(vocab_size=30522))
        )
    )
    tagger = ClipTagger(
        clip,
        clip_tokenizer,
        CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
        vocabulary,
    )
    detector = GroundingDinoDetector(
        dino,
        bert_tokenizer,
        GroundingDinoImageProcessorPil(size={"shortest_edge": 800, "longest_edge": 1333}),
    )
    return SpaSemSRGrounder(drm=frozen(RRDBNet()), tagger=tagger, detector=detector)


def demo_drm_of(directory: Path) -> str | None:
    """The DRM choice a saved demo grounder was built with (``None``: no complete folder)."""
    config_file = directory / SpaSemSRGrounder.config_name
    if not config_file.is_file():
        return None
    try:
        document = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    weights = str(document.get("config", {}).get("drm_weights", ""))
    # Folders written before the DRM was recorded have the tiny DRM.
    return weights.split(":", 1)[0] if weights else "tiny"


def ensure_demo_grounder(
    directory: Path,
    *,
    seed: int = 0,
    drm: DrmChoice = DEMO_DRM,
    cache_root: Path | None = None,
) -> Path:
    """Build the demo grounder once and save it at ``directory``; later calls just return it.

    The demo grounder is the tiny one with, by default, the trained Real-ESRGAN x4plus as its
    DRM, converted once into ``cache_root`` (default: ``directory``'s parent, where the
    Real-ESRGAN upscalers keep theirs). A folder built with another DRM choice is rebuilt.

    Safe when several processes race: each builds into its own temporary folder beside the target
    and renames it into place; a loser finds the folder taken and discards its copy.
    """
    directory = Path(directory)
    if demo_drm_of(directory) == drm:
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    root = Path(cache_root) if cache_root is not None else directory.parent
    scratch = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build_tiny_grounder(seed, drm=drm, cache_root=root).save_pretrained(scratch)
        _replace_folder(scratch, directory, is_current=lambda: demo_drm_of(directory) == drm)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return directory


def _replace_folder(scratch: Path, directory: Path, *, is_current: Callable[[], bool]) -> None:
    """Rename ``scratch`` to ``directory``, first setting aside a stale folder there."""
    if directory.exists() and not is_current():
        stale = directory.parent / f".{directory.name}.stale-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(OSError):
            directory.rename(stale)  # another process may have moved it first
        shutil.rmtree(stale, ignore_errors=True)
    try:
        scratch.rename(directory)
    except OSError:
        # Another process won the race (the target now exists and is not empty).
        if not is_current():
            raise
        logger.info("demo grounder at %s was written by another process", directory)
