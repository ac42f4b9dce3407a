"""`forge data inspect`: the first examples exactly as the model sees them, split into trained and masked text.

It runs the data stage's own code (read, normalize, chat template, tokenize and label, truncate) on the
first rows, then decodes the token ids back to text in runs of trained / masked tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge.config import DataConfig
from forge.data.build import Problems, read_samples, render_items
from forge.data.encoding import encode, trained_count, truncate
from forge.data.readers import dataset_files
from forge.data.shards import IGNORE_INDEX


@dataclass(frozen=True)
class Span:
    """A run of consecutive tokens that are all trained or all masked, decoded to text."""

    text: str
    trained: bool


@dataclass
class InspectedExample:
    """One example as the model sees it after truncation, and what truncation cut away."""

    where: str
    spans: list[Span]
    tokens: int  # after truncation
    trained_tokens: int  # after truncation
    full_tokens: int  # before truncation
    truncated_at: int | None  # the token index where data.max_seq_len cut (None: it fits)
    cut_text: str  # the text of the tokens beyond the cut (never seen in training)

    @property
    def dropped(self) -> bool:
        """The data stage leaves the example out: no token of it carries a label."""
        return self.trained_tokens == 0


def inspect_examples(
    source: Path, tokenizer: Any, cfg: DataConfig, n: int = 3, log: Callable[[str], None] = print
) -> list[InspectedExample]:
    """The first n examples of the dataset at source, prepared as the data stage prepares them."""
    problems = Problems(cfg.on_error, log)
    items, _ = read_samples(dataset_files(source), cfg, problems, log, limit=n)
    rendered = render_items(tokenizer, items, cfg.train_on, problems)
    encoded = encode(tokenizer, [r for _, r in rendered])
    result = []
    for (item, _), full in zip(rendered, encoded, strict=True):
        kept, cut = truncate(full, cfg.max_seq_len)
        result.append(
            InspectedExample(
                where=item.where,
                spans=token_spans(tokenizer, kept.input_ids, kept.labels),
                tokens=len(kept.input_ids),
                trained_tokens=trained_count(kept),
                full_tokens=len(full.input_ids),
                truncated_at=cfg.max_seq_len if cut else None,
                cut_text=_decode(tokenizer, full.input_ids[cfg.max_seq_len :]) if cut else "",
            )
        )
    return result


def token_spans(tokenizer: Any, ids: Sequence[int], labels: Sequence[int]) -> list[Span]:
    """The tokens as text in runs of trained (label set) and masked (label -100) tokens.

    Each run's text is the growth of the decoded prefix, so a tokenizer that decodes a lone token differently
    from the same token in context (SentencePiece's leading space) still shows the text as the model sees it.
    """
    bounds = [0] + [i for i in range(1, len(ids)) if (labels[i] != IGNORE_INDEX) != (labels[i - 1] != IGNORE_INDEX)]
    bounds.append(len(ids))
    spans = []
    before = ""
    for start, end in zip(bounds, bounds[1:], strict=False):
        if start == end:
            continue
        upto = _decode(tokenizer, ids[:end])
        text = upto[len(before) :] if upto.startswith(before) else _decode(tokenizer, ids[start:end])
        spans.append(Span(text, labels[start] != IGNORE_INDEX))
        before = upto
    return spans


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
