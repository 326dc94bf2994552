"""Grounding DINO prompt encoding, thresholds, NMS and box normalisation at tiny size."""

from __future__ import annotations

from dataclasses import replace

import torch
from PIL import Image

from model.configs.grounding import bert_vocabulary
from model.grounding import SpaSemSRGrounder
from model.grounding.detector import caption_for_tags
from model.grounding.nms import box_iou

from .conftest import natural_image


def test_tiny_bert_vocabulary_puts_grounding_dino_special_tokens_at_bert_ids() -> None:
    vocab = bert_vocabulary(["traffic light", "close-up"])
    assert [vocab[i] for i in (0, 100, 101, 102, 1012, 1029)] == [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        ".",
        "?",
    ]
    assert {"traffic", "light", "close", "up"} <= set(vocab)
    assert len(vocab) == len(set(vocab))


def test_caption_for_tags_spans() -> None:
    text, spans = caption_for_tags(["Sky", "traffic light"])
    assert text == "sky. traffic light."
    assert [text[a:b] for a, b in spans] == ["sky", "traffic light"]


def test_prompt_masks_cover_each_tags_tokens(tiny_grounder: SpaSemSRGrounder) -> None:
    detector = tiny_grounder.detector
    prompt = detector.encode_prompt(["sky", "traffic light", "zebra"])
    ids = prompt.encoding["input_ids"][0]
    tokens = detector.tokenizer.convert_ids_to_tokens(ids.tolist())
    assert tokens == ["[CLS]", "sky", ".", "traffic", "light", ".", "zebra", ".", "[SEP]"]
    assert [int(i) for i in ids[[0, 2, -1]]] == [101, 1012, 102]
    owned = [[tokens[i] for i in row.nonzero().flatten().tolist()] for row in prompt.tag_token_mask]
    assert owned == [["sky"], ["traffic", "light"], ["zebra"]]


def test_tags_are_split_into_prompts_that_fit_the_text_length(
    tiny_grounder: SpaSemSRGrounder,
) -> None:
    detector = tiny_grounder.detector
    tags = list(tiny_grounder.tagger.vocabulary.tags[:80])
    groups = detector.tag_groups(tags)
    assert len(groups) > 1
    assert [t for group in groups for t in group] == tags
    for group in groups:
        length = detector.encode_prompt(group).encoding["input_ids"].shape[1]
        assert length <= detector.max_text_len


def test_detections_are_normalised_deduplicated_and_thresholded(
    tiny_grounder: SpaSemSRGrounder,
) -> None:
    detector = tiny_grounder.detector
    image = natural_image(80).resize((120, 80))
    tags = ["sky", "tree", "dog", "traffic light"]
    original = detector.settings
    try:
        detector.settings = replace(original, max_detections=100)
        detections = detector.detect(image, tags)
        assert detections, "random tiny weights score about 0.5 everywhere: some boxes pass"
        assert {d.tag for d in detections} <= set(tags)
        for d in detections:
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1
            assert d.score > original.text_threshold
            # The normalised box is the pixel box over the whole image's size (clipped to it).
            px0, py0, px1, py1 = d.pixel_box
            expected = (
                min(max(px0 / 120, 0), 1),
                min(max(py0 / 80, 0), 1),
                min(max(px1 / 120, 0), 1),
                min(max(py1 / 80, 0), 1),
            )
            assert torch.allclose(torch.tensor(d.box), torch.tensor(expected), atol=1e-6)
        for tag in tags:
            same = torch.tensor([d.pixel_box for d in detections if d.tag == tag])
            if len(same) > 1:
                iou = box_iou(same, same) - torch.eye(len(same))
                assert iou.max() <= original.nms_iou + 1e-6
        detector.settings = replace(original, box_threshold=1.0)
        assert detector.detect(image, tags) == []
        assert detector.detect(image, []) == []
        # A tag longer than the detector's text length is skipped, not truncated into nonsense.
        assert detector.detect(image, [" ".join(["sky"] * 100)]) == []
    finally:
        detector.settings = original


def test_grayscale_input_is_accepted(tiny_grounder: SpaSemSRGrounder) -> None:
    detections = tiny_grounder.detector.detect(Image.new("L", (40, 30), 128), ["sky"])
    assert all(d.tag == "sky" for d in detections)
