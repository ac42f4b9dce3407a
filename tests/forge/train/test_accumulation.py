"""Gradient accumulation: batch 8 in one step equals 8 micro-batches of 1 (loss over all target tokens)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from forge.data.shards import build_split
from forge.train.batches import make_batch
from forge.train.loop import train_step
from forge.train.loss import count_targets, summed_loss
from forge.train.precision import Precision
from forge.train.recipe import run_training

from .synthetic import arithmetic_examples

CPU = torch.device("cpu")
FP32 = Precision("fp32")


def sgd_update(model_dir, micro_batches) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and weights after one plain-SGD step (lr 1, so the update is exactly the gradient)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loss, _ = train_step(model, micro_batches, opt, None, None, FP32, CPU).values()
    return loss, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_one_batch_of_8_equals_8_accumulated_batches_of_1(tiny_llama_dir):
    split = build_split([[e] for e in arithmetic_examples(8, seed=5)])
    one_batch = [make_batch(split, list(range(8)), pad_id=0)]
    accumulated = [make_batch(split, [i], pad_id=0) for i in range(8)]
    targets = [count_targets(b) for b in accumulated]
    assert len(set(targets)) > 1  # uneven target counts: a per-micro-batch mean would weigh them wrongly

    loss_a, weights_a = sgd_update(tiny_llama_dir, one_batch)
    loss_b, weights_b = sgd_update(tiny_llama_dir, accumulated)
    assert abs(loss_a - loss_b) < 1e-5
    for name, tensor in weights_a.items():
        torch.testing.assert_close(weights_b[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

    # The well-known bug, averaging each micro-batch's mean loss, gives a different loss here.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        naive = sum(float(summed_loss(model, b, FP32, CPU)) / n for b, n in zip(accumulated, targets, strict=True))
    assert abs(naive / 8 - loss_a) > 1e-3


def test_training_runs_agree_across_batch_size_and_accumulation(
    tiny_llama_dir, arithmetic_data, small_config, tmp_path
):
    runs = {}
    for name, (bs, ga) in {"bs8": (8, 1), "bs1ga8": (1, 8)}.items():
        cfg = small_config(batch_size=bs, grad_accum=ga, max_steps=3, eval_every=3, save_every=100)
        out = tmp_path / name / "out"
        out.mkdir(parents=True)
        run_training(tiny_llama_dir, arithmetic_data, cfg, out, tmp_path / name / "work", log=lambda _: None)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (
            [r["loss"] for r in rows if "loss" in r],
            load_file(str(out / "adapter" / "adapter_model.safetensors")),
        )
    (losses_a, adapter_a), (losses_b, adapter_b) = runs["bs8"], runs["bs1ga8"]
    assert len(losses_a) == 3
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    for name, tensor in adapter_a.items():
        torch.testing.assert_close(adapter_b[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
