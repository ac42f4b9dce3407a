"""What a run leaves: metrics.jsonl, TensorBoard events, loss.png, train_stats.json; early stopping; logs."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from forge.train.metrics import read_metrics
from forge.train.recipe import run_training

from .synthetic import arithmetic_examples, write_data


def run(model, data, cfg, tmp_path):
    out = tmp_path / "out"
    out.mkdir(parents=True)
    lines: list[str] = []
    stats = run_training(model, data, cfg, out, tmp_path / "work", log=lines.append)
    return out, stats, lines


def test_a_run_writes_metrics_tensorboard_loss_curve_and_stats(tiny_llama_dir, arithmetic_data, small_config, tmp_path):
    out, stats, lines = run(tiny_llama_dir, arithmetic_data, small_config(max_steps=6, eval_every=3), tmp_path)

    rows = read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in eval_rows] == [0, 3, 6]  # before training, every 3 steps, at the end
    assert all(r["lr"] > 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in train_rows)
    assert train_rows[-1]["epoch"] == pytest.approx(1.0)  # 48 sequences, batch 8: 6 steps are one epoch

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in events.Scalars("eval_loss")] == pytest.approx([r["eval_loss"] for r in eval_rows])

    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    saved = json.loads((out / "train_stats.json").read_text())
    assert saved == {k: v for k, v in stats.items() if k != "line"}
    assert saved["steps"] == 6 and saved["tokens"] == train_rows[-1]["tokens"]
    assert saved["eval_loss"] == eval_rows[-1]["eval_loss"]
    assert saved["train_loss"] == train_rows[-1]["loss"]
    assert saved["initial_eval_loss"] == eval_rows[0]["eval_loss"]
    assert saved["peak_memory_mib"] > 0 and saved["tokens_per_s"] > 0
    assert stats["line"].startswith("lora 6 steps") and "eval loss" in stats["line"]
    assert any(line.startswith("activation checkpointing: none") for line in lines)


def test_early_stopping_ends_the_run_when_eval_loss_stops_improving(
    tiny_llama_dir, arithmetic_data, small_config, tmp_path
):
    # A learning rate this high makes the eval loss climb from the first step on.
    cfg = small_config(method="full", lr=0.5, warmup_ratio=0.0, max_steps=20, eval_every=1, early_stopping_patience=2)
    out, stats, lines = run(tiny_llama_dir, arithmetic_data, cfg, tmp_path)
    evals = [r["eval_loss"] for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    assert stats["early_stopped"] and stats["steps"] < 20
    assert min(evals[-2:]) >= min(evals[:-2])  # the last `patience` evals did not beat the best before
    assert any("early stopping" in line for line in lines)


def test_activation_checkpointing_gives_the_same_losses(tiny_llama_dir, arithmetic_data, small_config, tmp_path):
    losses = {}
    for mode in ("none", "full"):
        out, _, lines = run(
            tiny_llama_dir, arithmetic_data, small_config(max_steps=2, gradient_checkpointing=mode), tmp_path / mode
        )
        recomputed = 2 if mode == "full" else 0
        why = f"recompute {recomputed} of 2 layers; train.gradient_checkpointing={mode}"
        assert f"activation checkpointing: {mode} ({why})" in lines
        losses[mode] = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert losses["full"] == pytest.approx(losses["none"], rel=1e-6)


def test_an_empty_eval_split_trains_without_evaluation(tiny_llama_dir, small_config, tmp_path):
    data = write_data(tmp_path / "data", arithmetic_examples(16, seed=3), [])
    _, stats, lines = run(tiny_llama_dir, data, small_config(max_steps=2, early_stopping_patience=1), tmp_path)
    assert stats["eval_loss"] is None and stats["steps"] == 2
    assert "eval split has no target tokens: no eval loss, no early stopping" in lines
    assert "train loss" in stats["line"]
