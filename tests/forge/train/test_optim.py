"""Schedules (warm-up then linear/cosine/constant) and the optimizers, real bitsandbytes included."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from forge.config import TrainConfig
from forge.train.optim import ListedFusedAdamW, lr_factor, make_optimizer, make_scheduler


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


def _lora_like(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3, bias=False))


def _fill_grads(model: torch.nn.Module, step: int, skip: torch.nn.Parameter | None = None) -> None:
    gen = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = None if p is skip else torch.randn(p.shape, generator=gen)


def _groups(model: torch.nn.Module) -> list[dict]:
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def test_listed_fused_adamw_updates_exactly_as_torchs_fused_adamw():
    """Six steps with a changing learning rate, two weight-decay groups and a step where one parameter has no
    gradient (torch skips it; so must the listed path): parameters and optimizer state equal bit for bit."""
    ours_model, ref_model = _lora_like(0), _lora_like(0)
    ours = ListedFusedAdamW(_groups(ours_model), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    ref = torch.optim.AdamW(_groups(ref_model), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, fused=True)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (s + 1)) for o in (ours, ref)]
    for step in range(6):
        _fill_grads(ours_model, step, skip=ours_model[0].bias if step == 3 else None)
        _fill_grads(ref_model, step, skip=ref_model[0].bias if step == 3 else None)
        ours.step()
        ref.step()
        for sched in scheds:
            sched.step()
    assert ours._listed is not None  # the fast path ran (and was rebuilt after the fallback step)
    for a, b in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(a, b)
        assert all(torch.equal(ours.state[a][k], ref.state[b][k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def test_listed_fused_adamw_resumes_from_its_state_dict_as_if_never_stopped():
    straight_model, resumed_model = _lora_like(1), _lora_like(1)
    straight = ListedFusedAdamW(_groups(straight_model), lr=1e-2)
    for step in range(5):
        _fill_grads(straight_model, step)
        straight.step()
        if step == 1:
            saved_params = {k: v.clone() for k, v in straight_model.state_dict().items()}
            saved_state = copy.deepcopy(straight.state_dict())
    resumed = ListedFusedAdamW(_groups(resumed_model), lr=1e-2)
    _fill_grads(resumed_model, 0)
    resumed.step()  # lists this optimizer's own state; loading must drop those lists
    resumed_model.load_state_dict(saved_params)
    resumed.load_state_dict(saved_state)
    for step in range(2, 5):
        _fill_grads(resumed_model, step)
        resumed.step()
    for a, b in zip(straight_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
