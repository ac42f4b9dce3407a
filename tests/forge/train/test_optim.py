"""Schedules (warm-up then linear/cosine/constant) and the optimizers, real bitsandbytes included."""

from __future__ import annotations

import math

import pytest
import torch

from forge.config import TrainConfig
from forge.train.optim import lr_factor, make_optimizer, make_scheduler


def factors(schedule: str, total: int = 100, warmup: int = 10) -> list[float]:
    return [lr_factor(s, total, warmup, schedule) for s in range(total)]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_warmup_climbs_to_the_peak_without_a_zero_step(schedule):
    f = factors(schedule)
    assert 0 < f[0] < f[5] < f[9] < 1
    assert f[10] == pytest.approx(1.0)


def test_decay_shapes():
    linear, cosine, constant = factors("linear"), factors("cosine"), factors("constant")
    assert all(a >= b for a, b in zip(linear[10:], linear[11:], strict=False))
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:], strict=False))
    assert linear[-1] < 0.02 and cosine[-1] < 0.001
    assert cosine[55] == pytest.approx(0.5, abs=1e-9)  # half-way through the decay
    assert linear[55] == pytest.approx(0.5, abs=1e-9)
    assert constant[10:] == [1.0] * 90


def test_scheduler_follows_the_config():
    model = torch.nn.Linear(4, 4)
    cfg = TrainConfig(lr=1e-3, warmup_ratio=0.1, schedule="cosine")
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 / 3)  # warm-up of ceil(20 * 0.1) = 2 steps
    assert lrs[2] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 17 / 18)))


def test_weight_decay_spares_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = make_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}


def test_adamw8bit_updates_weights_on_cpu():
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 64)  # big enough for 8-bit optimizer states
    opt = make_optimizer(model, TrainConfig(optimizer="adamw8bit", lr=1e-2))
    assert type(opt).__name__ == "AdamW8bit"
    before = model.weight.detach().clone()
    model(torch.randn(8, 256)).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(before, model.weight)
    assert opt.state[model.weight]["state1"].dtype == torch.uint8
