"""Checkpoints: a round trip restores everything a continuation needs; writes are atomic."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from forge.config import TrainConfig
from forge.train import checkpoint
from forge.train.checkpoint import checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from forge.train.optim import make_optimizer, make_scheduler

CFG = TrainConfig(lr=1e-2, warmup_ratio=0.2, schedule="cosine")


def parts(seed: int):
    """A model whose frozen part (like a base model) is the same whatever the seed, its optimizer, schedule."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    with torch.no_grad():
        model[0].bias.fill_(0.5)
    model[0].bias.requires_grad_(False)
    opt = make_optimizer(model, CFG)
    return model, opt, make_scheduler(opt, CFG, total_steps=10)


def train(model, opt, sched, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def draws() -> tuple[float, float, float]:
    return float(torch.rand(())), random.random(), float(np.random.rand())


def test_round_trip_continues_exactly_like_the_uninterrupted_run(tmp_path):
    model, opt, sched = parts(seed=0)
    train(model, opt, sched, 3)
    save_checkpoint(tmp_path, 3, model, opt, sched, None, {"step": 3, "tokens": 120})
    expected = draws()
    train(model, opt, sched, 2)  # the uninterrupted run goes on

    resumed, resumed_opt, resumed_sched = parts(seed=1)  # fresh process: other initial weights
    progress = load_checkpoint(latest_checkpoint(tmp_path), resumed, resumed_opt, resumed_sched, None)
    assert progress == {"step": 3, "tokens": 120}
    assert draws() == expected  # torch, python and numpy generators all restored
    train(resumed, resumed_opt, resumed_sched, 2)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed_sched.get_last_lr() == sched.get_last_lr()


def test_a_write_that_dies_halfway_leaves_the_previous_checkpoint_latest(tmp_path, monkeypatch):
    model, opt, sched = parts(seed=0)
    first = save_checkpoint(tmp_path, 2, model, opt, sched, None, {"step": 2})

    def dies_while_writing(obj, path):
        path.write_bytes(b"\x80\x02half a pickle")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", dies_while_writing)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 4, model, opt, sched, None, {"step": 4})
    monkeypatch.undo()

    assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    assert latest_checkpoint(tmp_path) == first
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())  # leftovers swept
    assert load_checkpoint(first, *parts(seed=0), None) == {"step": 2}


def test_only_the_newest_checkpoint_is_kept(tmp_path):
    model, opt, sched = parts(seed=0)
    for step in (3, 6, 9):
        save_checkpoint(tmp_path, step, model, opt, sched, None, {"step": step})
    assert [p.name for p in checkpoints(tmp_path)] == ["step-0000009"]


def test_a_checkpoint_of_another_model_is_refused_with_the_folder_to_delete(tmp_path):
    model, opt, sched = parts(seed=0)
    path = save_checkpoint(tmp_path, 1, model, opt, sched, None, {"step": 1})
    other = torch.nn.Linear(8, 2)
    other_opt = make_optimizer(other, CFG)
    with pytest.raises(ValueError, match=r"does not match the model.*delete"):
        load_checkpoint(path, other, other_opt, make_scheduler(other_opt, CFG, 10), None)
