"""Loss over packed batches: identical to the same examples unpacked, on every attention implementation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from forge.data.shards import Example, build_split
from forge.train.batches import make_batch
from forge.train.loss import count_targets, summed_loss
from forge.train.precision import Precision

from .synthetic import char_ids, example

CPU = torch.device("cpu")
FP32 = Precision("fp32")


def fully_labelled(text: str) -> Example:
    """Every token is a target (train_on: all), so a leak across a packing boundary would show."""
    ids = char_ids(text)
    return Example(ids, list(ids))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("make", [fully_labelled, lambda t: example(t[:3], t[3:])], ids=["all", "responses"])
def test_packed_batch_gives_the_same_loss_as_the_examples_unpacked(tiny_llama_dir, attn, make):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation=attn).eval()
    examples = [make("12+34=46"), make("7+5=12"), make("99+99=198")]
    packed = build_split([examples])
    unpacked = build_split([[e] for e in examples])
    packed_batch = make_batch(packed, [0], pad_id=0)
    unpacked_batch = make_batch(unpacked, [0, 1, 2], pad_id=0)

    assert count_targets(packed_batch) == count_targets(unpacked_batch) > 0
    with torch.no_grad():
        packed_loss = summed_loss(model, packed_batch, FP32, CPU)
        unpacked_loss = summed_loss(model, unpacked_batch, FP32, CPU)
    torch.testing.assert_close(packed_loss, unpacked_loss, rtol=1e-5, atol=1e-5)


def test_first_token_of_an_example_is_never_a_target():
    split = build_split([[fully_labelled("abc"), fully_labelled("de")]])
    batch = make_batch(split, [0], pad_id=0)
    # 5 tokens, 4 next-token predictions, of which 'c' -> 'd' crosses into the second example.
    assert count_targets(batch) == 3


def test_padding_carries_no_loss(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    split = build_split([[example("1+1=", "2")], [example("10+20=", "30")]])
    alone = make_batch(split, [0], pad_id=0)
    padded = make_batch(split, [0, 1], pad_id=0)  # the first row gets padded to the second's length
    with torch.no_grad():
        both = summed_loss(model, padded, FP32, CPU)
        first = summed_loss(model, alone, FP32, CPU)
        second = summed_loss(model, make_batch(split, [1], pad_id=0), FP32, CPU)
    torch.testing.assert_close(both, first + second, rtol=1e-5, atol=1e-5)


def test_a_batch_without_position_ids_is_one_example_a_row(tiny_llama_dir):
    """input_ids and labels only (a plain batch, as benchmarks pass): every next token is a target, and the
    loss is the model's own summed cross-entropy."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    assert count_targets(batch) == 2 * 8
    with torch.no_grad():
        loss = summed_loss(model, batch, FP32, CPU)
        mean = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, mean * 16, rtol=1e-5, atol=1e-5)
