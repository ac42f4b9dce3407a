"""Packing: bins respect the length limit, and packed examples never see each other — on the tensors,
and in a real forward pass (tiny random Llama with SDPA and eager attention, and SmolLM2 itself)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from forge.data.packing import pack
from forge.data.shards import Example, additive_mask, block_causal_mask, build_split, collate


def test_pack_fills_bins_within_capacity_and_uses_every_example_once() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = pack(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    lower_bound = -(-sum(lengths) // 128)
    assert len(bins) <= lower_bound * 1.1  # best-fit decreasing leaves little room unused
    assert pack(lengths, 128) == bins  # deterministic


def test_pack_rejects_an_example_longer_than_the_capacity() -> None:
    with pytest.raises(ValueError, match="more than the capacity"):
        pack([3, 9], 8)


def random_examples(lengths: list[int], vocab: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        out.append(Example(ids, ids))
    return out


def test_block_causal_mask_never_crosses_examples_and_positions_restart() -> None:
    examples = random_examples([5, 7, 4], vocab=50)
    split = build_split([examples, [examples[1]]])
    batch = collate([split.sequence(0), split.sequence(1)], pad_id=0)
    assert batch["position_ids"][0].tolist() == [*range(5), *range(7), *range(4)]
    mask = batch["attention_mask"][:, 0]
    owner = torch.tensor([0] * 5 + [1] * 7 + [2] * 4)
    allowed = (owner[:, None] == owner[None, :]) & torch.ones(16, 16, dtype=torch.bool).tril()
    assert torch.equal(mask[0], allowed)
    # Row 2: one example of 7 tokens, then padding that attends only to itself.
    expected_padded = torch.zeros(16, 16, dtype=torch.bool)
    expected_padded[:7, :7] = torch.ones(7, 7, dtype=torch.bool).tril()
    expected_padded[7:, 7:] = torch.eye(9, dtype=torch.bool)
    assert torch.equal(mask[1], expected_padded)
    assert batch["labels"][1, 7:].eq(-100).all()


def packed_vs_alone(model: torch.nn.Module, examples: list[Example], float_mask: bool) -> float:
    """Largest logit difference between a packed batch (plus one padded row) and each example run alone."""
    split = build_split([examples, [examples[0]]])
    batch = collate([split.sequence(0), split.sequence(1)], pad_id=0)
    mask = batch["attention_mask"]
    if float_mask:
        mask = additive_mask(mask, torch.float32)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask).logits
        worst = 0.0
        start = 0
        for ex in examples:
            alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            end = start + len(ex.input_ids)
            worst = max(worst, (packed[0, start:end] - alone).abs().max().item())
            start = end
        first = len(examples[0].input_ids)
        alone_first = model(input_ids=torch.tensor([examples[0].input_ids])).logits[0]
        worst = max(worst, (packed[1, :first] - alone_first).abs().max().item())
    return worst


TINY = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


@pytest.mark.parametrize(("attn", "float_mask"), [("sdpa", False), ("sdpa", True), ("eager", True)])
def test_packed_logits_match_each_example_alone_tiny_llama(attn: str, float_mask: bool) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(TINY, attn_implementation=attn).eval()
    examples = random_examples([6, 9, 3, 5], vocab=TINY.vocab_size)
    assert packed_vs_alone(model, examples, float_mask) < 1e-4


def test_eager_attention_needs_the_additive_mask() -> None:
    """Why additive_mask exists: eager attention adds the mask to the scores, so booleans are wrong there."""
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(TINY, attn_implementation="eager").eval()
    examples = random_examples([6, 9, 3, 5], vocab=TINY.vocab_size)
    assert packed_vs_alone(model, examples, float_mask=False) > 1e-2


@pytest.mark.slow
def test_packed_logits_match_each_example_alone_smollm2(smollm2_hf_dir: Path, smol_tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    texts = ["Answer: 300 centimeters", "Reason: 1 meter = 100 centimeters.", "Convert 5 hours to minutes."]
    examples = [Example(ids, ids) for ids in (smol_tokenizer(t)["input_ids"] for t in texts)]
    assert packed_vs_alone(model, examples, float_mask=False) < 1e-3
    assert packed_vs_alone(model, examples, float_mask=True) < 1e-3


def test_additive_mask_is_zero_where_allowed_and_very_negative_elsewhere() -> None:
    mask = block_causal_mask(torch.tensor([[0, 1, 0, 1, -1]]))
    add = additive_mask(mask, torch.bfloat16)
    assert add.dtype == torch.bfloat16
    assert torch.equal(add == 0, mask)
    assert (add[~mask] == torch.finfo(torch.bfloat16).min).all()
