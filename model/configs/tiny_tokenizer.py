"""A small CLIP byte-level BPE tokenizer the project writes itself, for tiny test and demo models.

No machine here reaches a model hub, so tiny configurations cannot fetch a real vocabulary.
This one has every byte as a token (with and without the end-of-word marker) plus merges
learned by counting pairs over a word list, so common words become one or a few tokens
while any text still tokenises. It is saved in the standard ``vocab.json`` / ``merges.txt``
layout and loaded back with transformers' ``CLIPTokenizer`` (backed by ``tokenizers``, so it
gives offsets).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"


def _byte_alphabet() -> dict[int, str]:
    """CLIP's byte-to-printable-character table (the byte-level BPE alphabet)."""
    table: dict[int, str] = bytes_to_unicode()  # type: ignore[no-untyped-call]
    return table


def _learn_merges(words: Iterable[str], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE over a word list: repeatedly merge the most frequent adjacent pair."""
    byte_to_char = _byte_alphabet()
    corpus: Counter[tuple[str, ...]] = Counter()
    for word in words:
        chars = [byte_to_char[b] for b in word.lower().encode("utf-8")]
        if chars:
            chars[-1] += END_OF_WORD
            corpus[tuple(chars)] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in corpus.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            break
        best, best_count = max(pairs.items(), key=lambda item: (item[1], item[0]))
        if best_count < 2:
            break
        merges.append(best)
        corpus = Counter({_merge_pair(symbols, best): n for symbols, n in corpus.items()})
    return merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def write_tiny_clip_tokenizer(
    directory: Path, *, words: Iterable[str] = (), num_merges: int = 200, max_length: int = 77
) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer config into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    base = list(_byte_alphabet().values())
    vocab_tokens = base + [c + END_OF_WORD for c in base]
    merges = _learn_merges(words, num_merges)
    vocab_tokens += ["".join(pair) for pair in merges]
    vocab_tokens += [START_TOKEN, END_TOKEN]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # the backend takes (left, right) pairs
        model_max_length=max_length,
        pad_token=END_TOKEN,
    )
    tokenizer.save_pretrained(directory)
    return directory


def load_tiny_clip_tokenizer(directory: Path) -> CLIPTokenizer:
    tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(directory)
    return tokenizer
