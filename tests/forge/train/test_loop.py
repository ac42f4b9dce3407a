"""The training step on a GPU queues its work without ever waiting for the host (no `.item()`, no
synchronizing copies): the GPU is never idle between steps because Python read a number.

The batches are the data stage's (packed, with the block-causal mask), or plain ones with input ids and
labels only (the speed benchmark's): transformers' packed-sequence check of the position ids, a host sync,
is answered without the device for those."""

from __future__ import annotations

import math

import pytest
import torch

from forge.config import TrainConfig
from forge.data.shards import build_split
from forge.train.batches import make_batch
from forge.train.loop import step_copies, train_step
from forge.train.model import load_model
from forge.train.optim import make_optimizer
from forge.train.precision import Precision
from forge.train.recompute import apply_recompute, plan_for_model

from .synthetic import PAD, arithmetic_examples

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("plain", [False, True], ids=["packed", "plain"])
@pytest.mark.parametrize("checkpointing", ["none", "offload"])
def test_a_training_step_never_synchronizes_with_the_host(tiny_llama_dir, checkpointing, plain):
    cuda = torch.device("cuda")
    cfg = TrainConfig(method="lora", lora_r=4, target_modules=ALL_LINEAR, gradient_checkpointing=checkpointing)
    precision = Precision("bf16")
    model = load_model(tiny_llama_dir, cfg, precision, cuda, log=lambda line: None)
    apply_recompute(model, plan_for_model(model, checkpointing, 128, cuda, 2))
    model.train()
    optimizer = make_optimizer(model, cfg)
    split = build_split([arithmetic_examples(4, seed=s) for s in range(4)])  # 4 sequences of 4 packed examples
    batches = [make_batch(split, [0, 1], PAD), make_batch(split, [2, 3], PAD)]  # two micro-batches
    if plain:
        batches = [{"input_ids": b["input_ids"], "labels": b["labels"]} for b in batches]
    with step_copies():  # as the loop runs its steps: the adapters' casts kept, refreshed after each update
        train_step(model, batches, optimizer, None, 1.0, precision, cuda)  # warm-up: kernels compile, handles open
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            result = train_step(model, batches, optimizer, None, 1.0, precision, cuda)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    loss, grad_norm = result.values()
    assert math.isfinite(loss) and loss > 0 and grad_norm > 0
