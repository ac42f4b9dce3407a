"""The train stage on 2 CPU processes through torchrun (gloo): the same adapter as 1 process, rank 0 alone
writes, and a checkpoint made by 2 processes resumes in 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forge.config import ForgeConfig, LoadedConfig, TrainConfig
from forge.pipeline import PipelineError, StageContext
from forge.stages.train import TrainStage
from forge.torch_threads import torch_threads
from forge.train.metrics import read_metrics
from forge.train.recipe import run_training

from .synthetic import arithmetic_examples, write_data

# 4 micro-batches of 4 per step: each of 2 ranks runs 2 whole micro-batches (DDP skips the first sync).
CONFIG = dict(
    lr=3e-3, batch_size=4, grad_accum=4, max_steps=6, eval_every=3, save_every=3, lora_r=4, lora_alpha=8.0,
    precision="fp32",
)  # fmt: skip
# fp32 on CPU: the 2-process adapter differs from the 1-process one only by the order of gradient sums
# (measured: at most 2.6e-7 on weights up to 0.13).
ATOL = 2e-6
ADAPTER = "adapter/adapter_model.safetensors"


def stage_run(base_model: Path, data: Path, train: TrainConfig, root: Path) -> tuple[dict, Path, Path, list[str]]:
    """TrainStage.run as the pipeline calls it, on CPU processes; returns (summary, out, work, log lines)."""
    (root / "base").mkdir(parents=True)
    (root / "base" / "model").symlink_to(base_model)
    out, work = root / "out", root / "work"
    out.mkdir()
    loaded = LoadedConfig(config=ForgeConfig(train=train), source="test", root=root)
    lines: list[str] = []
    ctx = StageContext(loaded, out, work, {"base": root / "base", "data": data}, "e" * 64, lines.append)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUDA_VISIBLE_DEVICES", "")  # CPU processes and gloo, also on a GPU machine
        mp.setenv("OMP_NUM_THREADS", "1")
        return TrainStage().run(ctx), out, work, lines


def one_process(base_model: Path, data: Path, train: TrainConfig, root: Path, work: Path | None = None):
    out = root / "out"
    out.mkdir(parents=True)
    lines: list[str] = []
    with torch_threads(1):
        stats = run_training(base_model, data, train, out, work or root / "work", log=lines.append)
    return stats, out, lines


def assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / ADAPTER)), load_file(str(b / ADAPTER))
    assert wa.keys() == wb.keys()
    for name, tensor in wa.items():
        torch.testing.assert_close(wb[name], tensor, rtol=0, atol=ATOL, msg=name)


def train_losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, arithmetic_data, tmp_path_factory) -> Path:
    return one_process(tiny_llama_dir, arithmetic_data, TrainConfig(**CONFIG), tmp_path_factory.mktemp("one"))[1]


@pytest.fixture(scope="module")
def two(tiny_llama_dir, arithmetic_data, tmp_path_factory):
    train = TrainConfig(**CONFIG, nproc=2)
    return stage_run(tiny_llama_dir, arithmetic_data, train, tmp_path_factory.mktemp("two"))


def test_two_processes_train_the_adapter_one_process_trains(two, reference):
    summary, out, _, lines = two
    assert_same_adapter(out, reference)
    assert train_losses(out) == pytest.approx(train_losses(reference), rel=1e-6, abs=0)
    ref = json.loads((reference / "train_stats.json").read_text())
    for key in ("steps", "tokens", "target_tokens"):
        assert summary[key] == ref[key], key
    assert summary["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-6)
    assert (summary["processes"], summary["distributed"]) == (2, "ddp")
    assert summary["line"].startswith("lora 6 steps")
    assert lines.count("distributed: ddp over 2 processes (LoRA on CPU processes)") == 1


def test_only_rank_0_writes(two):
    _, out, work, lines = two
    assert {p.name for p in out.iterdir()} == {"adapter", "train_stats.json", "metrics.jsonl", "tb", "loss.png"}
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 3, 4, 5, 6, 6]  # one writer: every row once
    assert len(list((out / "tb").iterdir())) == 1  # one TensorBoard writer (the file name holds its pid)
    assert {p.name for p in work.iterdir()} == {"checkpoints", "metrics.jsonl", "tb"}  # launch.json removed
    assert [p.name for p in (work / "checkpoints").iterdir()] == ["step-0000003"]
    assert sum(line.startswith("step 6/6: eval loss") for line in lines) == 1


def test_one_process_resumes_a_two_process_checkpoint(two, reference, tiny_llama_dir, arithmetic_data, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(two[2], work)  # step-0000003, written by rank 0 of the 2-process run
    stats, out, lines = one_process(tiny_llama_dir, arithmetic_data, TrainConfig(**CONFIG), tmp_path, work)
    assert "resuming from checkpoint step-0000003 (step 3 of 6)" in lines
    assert stats["resumed_from_step"] == 3 and stats["processes"] == 1
    assert_same_adapter(out, reference)
    assert train_losses(out) == pytest.approx(train_losses(reference), rel=1e-6, abs=0)


@pytest.mark.slow
def test_fsdp_with_empty_shares_matches_one_process(tiny_llama_dir, tmp_path):
    # batch 1 x 3 micro-batches over 2 ranks: every micro-batch is split and one rank's part is empty (it
    # runs a masked batch); 15 eval batches: one rank scores a masked 16th.
    data = write_data(tmp_path / "data", arithmetic_examples(48, seed=1), arithmetic_examples(15, seed=2))
    config = {**CONFIG, "batch_size": 1, "grad_accum": 3, "max_steps": 4, "eval_every": 2, "save_every": 2}
    _, ref_out, _ = one_process(tiny_llama_dir, data, TrainConfig(**config), tmp_path / "one")
    train = TrainConfig(**config, nproc=2, distributed="fsdp")
    summary, out, _, lines = stage_run(tiny_llama_dir, data, train, tmp_path / "two")
    assert "distributed: fsdp over 2 processes (train.distributed=fsdp)" in lines
    assert summary["distributed"] == "fsdp"
    assert_same_adapter(out, ref_out)
    assert summary["eval_loss"] == pytest.approx(json.loads((ref_out / "train_stats.json").read_text())["eval_loss"])


@pytest.mark.slow
def test_a_failing_rank_stops_the_stage_with_its_one_line_error(tiny_llama_dir, arithmetic_data, tmp_path):
    train = TrainConfig(**CONFIG, nproc=2, target_modules=["q_projj"])
    with pytest.raises(PipelineError, match=r"^train: 2-process run failed: rank \d: train.target_modules: 'q_projj'"):
        stage_run(tiny_llama_dir, arithmetic_data, train, tmp_path)
