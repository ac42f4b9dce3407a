"""Per-position scores from logits: log-probabilities, negative log-likelihood, KL divergence, top-1 match."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (rows of a [n, vocab] array)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logprobs: np.ndarray, logprobs: np.ndarray) -> np.ndarray:
    """KL(ref || other) per row, in nats, from two [n, vocab] log-probability arrays."""
    ref = ref_logprobs.astype(np.float64)
    return (np.exp(ref) * (ref - logprobs)).sum(axis=-1)


@dataclass
class Accumulator:
    """Running sums over scored positions: NLL, and (against a reference) KL and top-1 agreement."""

    nll_sum: float = 0.0
    count: int = 0
    kl_sum: float = 0.0
    top1_same: int = 0
    compared: int = 0
    kl_values: list[np.ndarray] = field(default_factory=list)

    def add(self, logprobs: np.ndarray, targets: np.ndarray, ref_logprobs: np.ndarray | None = None) -> None:
        """Add rows of log-probabilities with the token each row should predict (and the reference rows)."""
        self.nll_sum += float(-logprobs[np.arange(len(targets)), targets].sum())
        self.count += len(targets)
        if ref_logprobs is not None:
            kl = kl_divergence(ref_logprobs, logprobs)
            self.kl_sum += float(kl.sum())
            self.kl_values.append(kl)
            self.top1_same += int((ref_logprobs.argmax(axis=-1) == logprobs.argmax(axis=-1)).sum())
            self.compared += len(targets)

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.count if self.count else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.count else math.nan

    @property
    def mean_kl(self) -> float | None:
        return self.kl_sum / self.compared if self.compared else None

    @property
    def kl_p99(self) -> float | None:
        return float(np.percentile(np.concatenate(self.kl_values), 99)) if self.kl_values else None

    @property
    def top1(self) -> float | None:
        return self.top1_same / self.compared if self.compared else None
