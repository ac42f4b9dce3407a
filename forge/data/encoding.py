"""Rendered text to token ids and labels: a token is trained when it overlaps a trained span.

Overlap rather than containment: a BPE token can straddle the start of an assistant turn (a template
ending its prompt with "Assistant: " and a tokenizer merging the space into the first word), and the
content must still be trained. End-of-turn markers are special tokens, so nothing straddles a span's end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from forge.data.shards import IGNORE_INDEX, Example
from forge.data.templating import Rendered

BATCH = 512  # texts per tokenizer call (fast tokenizers encode a batch in parallel)


def encode(tokenizer: Any, rendered: Sequence[Rendered]) -> list[Example]:
    """Tokenize every rendered text (in batches) and label the tokens that overlap its spans."""
    examples: dict[int, Example] = {}
    for special in (False, True):
        todo = [i for i, r in enumerate(rendered) if r.add_special_tokens == special]
        for lo in range(0, len(todo), BATCH):
            chunk = todo[lo : lo + BATCH]
            enc = tokenizer([rendered[i].text for i in chunk], add_special_tokens=special, return_offsets_mapping=True)
            for i, ids, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"], strict=True):
                examples[i] = Example(list(ids), label_tokens(ids, offsets, rendered[i].spans))
    return [examples[i] for i in range(len(rendered))]


def label_tokens(ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """Labels for ids: the id where the token overlaps a span (zero-width tokens never), else -100."""
    if not len(ids):
        return []
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = bounds[:, 0], bounds[:, 1]
    trained = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        trained |= (starts < b) & (ends > a)
    trained &= ends > starts
    return np.where(trained, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()


def truncate(example: Example, max_len: int) -> tuple[Example, bool]:
    """The example cut to its first max_len tokens, and whether it was cut."""
    if len(example.input_ids) <= max_len:
        return example, False
    return Example(example.input_ids[:max_len], example.labels[:max_len]), True


def trained_count(example: Example) -> int:
    return sum(1 for label in example.labels if label != IGNORE_INDEX)
