"""Each rank's share of a step, the target count without a batch, DDP or FSDP, gradient clipping."""

from __future__ import annotations

import pytest
import torch

from forge.data.shards import build_split
from forge.train.batches import BatchOrder, make_batch, masked_batch, sequence_targets
from forge.train.distributed import choose_mode, clip_gradients, rank_share
from forge.train.loss import count_targets

from .synthetic import arithmetic_examples, example


@pytest.mark.parametrize(("batch_size", "grad_accum", "world"), [(4, 4, 2), (8, 1, 2), (1, 3, 2), (3, 2, 4), (5, 6, 3)])
def test_the_ranks_share_out_exactly_the_sequences_of_the_one_process_step(batch_size, grad_accum, world):
    order = BatchOrder(23, batch_size, grad_accum, seed=7)
    for step in range(5):  # across an epoch boundary: the last micro-batch of an epoch is short
        indices = order.step(step)
        shares = [rank_share(indices, rank, world) for rank in range(world)]
        assert len({len(share) for share in shares}) == 1  # same number of micro-batches on every rank
        dealt = sorted(i for share in shares for micro in share for i in micro)
        assert dealt == sorted(i for micro in indices for i in micro)
        if grad_accum % world == 0:  # whole micro-batches: the per-rank batch stays batch_size
            assert all(micro in indices for share in shares for micro in share)


def test_a_share_is_empty_only_when_a_micro_batch_has_fewer_sequences_than_ranks():
    step = [[5], [9]]  # batch 1, accumulation 2, 4 ranks
    assert [rank_share(step, r, 4) for r in range(4)] == [[[5], [9]], [[], []], [[], []], [[], []]]
    assert rank_share(step, 1, 2) == [[9]]  # 2 ranks: one micro-batch each


def test_sequence_targets_counts_what_the_loss_counts():
    packed = [arithmetic_examples(3, seed=4), arithmetic_examples(1, seed=5), [example("1+1=", "2")]]
    split = build_split(packed)
    for i in range(len(split)):
        assert sequence_targets(split, i) == count_targets(make_batch(split, [i], pad_id=0))
    assert count_targets(make_batch(split, [0, 1, 2], pad_id=0)) == sum(sequence_targets(split, i) for i in range(3))
    assert count_targets(masked_batch(split, 0, pad_id=0)) == 0


def test_auto_shards_full_fine_tunes_and_replicates_lora_on_cpu(tiny_llama_dir):
    cpu = torch.device("cpu")
    assert choose_mode("auto", "full", tiny_llama_dir, cpu, torch.float32)[0] == "fsdp"
    assert choose_mode("auto", "lora", tiny_llama_dir, cpu, torch.float32)[0] == "ddp"
    assert choose_mode("fsdp", "lora", tiny_llama_dir, cpu, torch.float32) == ("fsdp", "train.distributed=fsdp")
    with pytest.raises(ValueError, match=r"^train.distributed=fsdp: QLoRA's 4-bit base cannot be sharded"):
        choose_mode("fsdp", "qlora", tiny_llama_dir, cpu, torch.float32)


@pytest.mark.parametrize("max_norm", [None, 1.0, 1e6])
def test_clip_gradients_gives_torchs_norm_and_clipped_gradients_bit_for_bit(max_norm):
    """Forge's one-group path (hundreds of LoRA gradients on one device) against torch's clip_grad_norm_."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 64), (64, 16), (16,)] * 40
    ours = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    ref = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for a, b in zip(ours, ref, strict=True):
        a.grad = torch.randn(a.shape, generator=gen) * 0.05
        b.grad = a.grad.clone()
    ours[5].grad = None  # a parameter without a gradient this step
    ref[5].grad = None
    norm = clip_gradients(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(ref, max_norm if max_norm is not None else float("inf"), foreach=True)
    assert torch.equal(norm, expected)
    assert all(a.grad is None and b.grad is None or torch.equal(a.grad, b.grad) for a, b in zip(ours, ref, strict=True))
    if max_norm == 1.0:
        clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ours if p.grad is not None]))
        assert norm > 1.0 and clipped == pytest.approx(1.0, rel=1e-4)
