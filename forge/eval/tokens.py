"""The tokens every model is scored on: the first held-out examples, capped, with their labelled positions.

Each example is evaluated on its own (packed sequences are split back into examples, so no model ever
attends across an example boundary). Position t is scored when token t+1 carries a label, i.e. the
model is judged on predicting the tokens it was trained to produce (the responses with
data.train_on=responses, every token after the first with train_on=all).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from forge.data.shards import IGNORE_INDEX, TokenSplit


@dataclass
class EvalSet:
    """Token sequences (one per example) and, for each, the positions whose next token is scored."""

    sequences: list[np.ndarray]
    scored: list[np.ndarray]

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def num_scored(self) -> int:
        return sum(len(p) for p in self.scored)

    @property
    def longest(self) -> int:
        return max((len(s) for s in self.sequences), default=0)

    def targets(self, i: int) -> np.ndarray:
        """The token ids predicted at the scored positions of sequence i."""
        return self.sequences[i][self.scored[i] + 1]


def select_examples(split: TokenSplit, max_tokens: int) -> EvalSet:
    """The split's examples in order until max_tokens tokens in all (the last one is cut at the cap)."""
    offsets = split.example_offsets.tolist()
    ids = split.input_ids.numpy().astype(np.int64)
    labels = split.labels.numpy()
    sequences: list[np.ndarray] = []
    scored: list[np.ndarray] = []
    budget = max_tokens
    for a, b in zip(offsets[:-1], offsets[1:], strict=True):
        if budget < 2:
            break
        b = min(b, a + budget)
        budget -= b - a
        positions = np.nonzero(labels[a + 1 : b] != IGNORE_INDEX)[0]
        if len(positions):
            sequences.append(ids[a:b])
            scored.append(positions)
    return EvalSet(sequences, scored)
