"""Data order: which sequences make up each micro-batch of each optimizer step.

The order is a pure function of (seed, step): epoch e shuffles the training sequences with a generator
seeded from (seed, e), an epoch is cut into micro-batches of `batch_size` (the last one may be shorter),
and optimizer step k takes micro-batches k*grad_accum .. k*grad_accum + grad_accum - 1 of the endless
stream of epochs. Resuming at step k therefore needs nothing but k.
"""

from __future__ import annotations

import math

import torch

from forge.data.shards import IGNORE_INDEX, TokenSplit, collate

EPOCH_SEED_STRIDE = 1_000_003  # a prime, so (seed, epoch) pairs never share a generator seed in practice


class BatchOrder:
    """Deterministic shuffled micro-batches over a split, grouped into optimizer steps."""

    def __init__(self, num_sequences: int, batch_size: int, grad_accum: int, seed: int) -> None:
        if num_sequences <= 0:
            raise ValueError("the training split holds no sequences")
        self.num_sequences = num_sequences
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.micro_batches_per_epoch = math.ceil(num_sequences / batch_size)
        self._epoch = -1
        self._perm: list[int] = []

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        """max_steps when set, else enough steps to cover `epochs` passes (at least one)."""
        if max_steps is not None:
            return max_steps
        return max(1, math.ceil(epochs * self.micro_batches_per_epoch / self.grad_accum))

    def epoch_at(self, step: int) -> float:
        """Passes over the split completed after `step` optimizer steps."""
        return step * self.grad_accum / self.micro_batches_per_epoch

    def permutation(self, epoch: int) -> list[int]:
        """The shuffled sequence indices of one epoch."""
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + epoch)
            self._perm = torch.randperm(self.num_sequences, generator=gen).tolist()
            self._epoch = epoch
        return self._perm

    def micro_batch(self, index: int) -> list[int]:
        """Sequence indices of the index-th micro-batch of the stream."""
        epoch, within = divmod(index, self.micro_batches_per_epoch)
        start = within * self.batch_size
        return self.permutation(epoch)[start : start + self.batch_size]

    def step(self, step: int) -> list[list[int]]:
        """The micro-batches (lists of sequence indices) of optimizer step `step` (0-based)."""
        first = step * self.grad_accum
        return [self.micro_batch(first + j) for j in range(self.grad_accum)]


def make_batch(split: TokenSplit, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Collate the given sequences of a split into one padded batch."""
    return collate([split.sequence(i) for i in indices], pad_id)


def masked_batch(split: TokenSplit, index: int, pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of one sequence with no targets: a forward and backward that add nothing (a rank whose share
    of a step is empty runs it, so that every rank makes the same collective calls)."""
    batch = make_batch(split, [index], pad_id)
    batch["labels"].fill_(IGNORE_INDEX)
    return batch


def sequence_length(split: TokenSplit, index: int) -> int:
    """Tokens in the index-th sequence of a split."""
    return int(split.seq_offsets[index + 1] - split.seq_offsets[index])


def sequence_targets(split: TokenSplit, index: int) -> int:
    """Tokens of the index-th sequence that carry a loss: labelled and not the first token of an example
    (what `loss.count_targets` counts in a batch, without building one)."""
    a, b = int(split.seq_offsets[index]), int(split.seq_offsets[index + 1])
    labelled = split.labels[a + 1 : b] != IGNORE_INDEX
    return int((labelled & (split.position_ids[a + 1 : b] != 0)).sum())
