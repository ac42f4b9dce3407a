"""Token-level cross-entropy over (packed) batches, summed so callers can normalize over any token count."""

from __future__ import annotations

import torch

from forge.data.shards import IGNORE_INDEX, TokenSplit
from forge.models.loss import causal_lm_loss
from forge.train.batches import make_batch, masked_batch
from forge.train.distributed import SINGLE, Parallel
from forge.train.precision import Precision


def shifted_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The label each position predicts (the next token's), -100 where nothing is learned.

    The first token of every example is never a target: in a packed sequence (``position_ids`` restarting
    at 0) it would otherwise be predicted from the previous example's last token. Without position_ids,
    each row is one example.
    """
    targets = batch["labels"][:, 1:].clone()
    if "position_ids" in batch:
        targets[batch["position_ids"][:, 1:] == 0] = IGNORE_INDEX
    return targets


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Number of tokens that carry a loss in this batch."""
    return int((shifted_targets(batch) != IGNORE_INDEX).sum())


def summed_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], precision: Precision, device: torch.device
) -> torch.Tensor:
    """Sum of the cross-entropy over the batch's target tokens (a scalar with a graph), patched model or not."""
    with precision.autocast(device):
        return causal_lm_loss(model, batch, normalizer=1)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    split: TokenSplit,
    batch_size: int,
    pad_id: int,
    precision: Precision,
    device: torch.device,
    parallel: Parallel = SINGLE,
) -> float | None:
    """Mean cross-entropy per target token over the whole split (None when it has no targets).

    With several processes rank r scores batches r, r+world, ... and the sums are added up; under FSDP a
    rank short of a batch runs a masked one (every rank must make the same collective calls).
    """
    was_training = model.training
    model.eval()
    starts = list(range(0, len(split), batch_size))
    mine = starts[parallel.rank :: parallel.world]
    if parallel.mode == "fsdp" and starts:
        mine += [None] * (-(-len(starts) // parallel.world) - len(mine))
    total, tokens = 0.0, 0
    for start in mine:
        if start is None:
            batch = masked_batch(split, 0, pad_id)
        else:
            batch = make_batch(split, list(range(start, min(start + batch_size, len(split)))), pad_id)
        total += float(summed_loss(model, batch, precision, device))
        tokens += count_targets(batch)
    model.train(was_training)
    total, tokens = parallel.sum([total, tokens])
    return total / tokens if tokens else None
