"""Exact resume: a run killed with SIGKILL and started again ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forge.config import TrainConfig
from forge.torch_threads import torch_threads
from forge.train.metrics import read_metrics
from forge.train.recipe import run_training

CHILD = Path(__file__).with_name("train_child.py")
# Dropout on, into a second epoch, a checkpoint every 4 steps: RNG, data order and optimizer state all matter.
CONFIG = dict(
    method="lora",
    lora_r=4,
    lora_alpha=8.0,
    lora_dropout=0.1,
    lr=3e-3,
    batch_size=4,
    max_steps=16,
    eval_every=4,
    save_every=4,
    precision="fp32",
)


def spec(root: Path, model: Path, data: Path, **extra) -> str:
    paths = {"model": str(model), "data": str(data), "out": str(root / "out"), "work": str(root / "work")}
    return json.dumps({**paths, "config": CONFIG, **extra})


def start(spec_json: str) -> subprocess.Popen:
    # One thread as in the reference run; passive OpenMP waits keep a shared 2-core machine responsive.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(CHILD), spec_json], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(spec_json: str) -> str:
    proc = start(spec_json)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama_dir, arithmetic_data, tmp_path_factory) -> Path:
    out, work = tmp_path_factory.mktemp("uninterrupted"), tmp_path_factory.mktemp("uninterrupted-work")
    with torch_threads(1):  # as in the children
        run_training(tiny_llama_dir, arithmetic_data, TrainConfig(**CONFIG), out, work, log=print)
    return out


def assert_same_run(resumed_out: Path, reference_out: Path) -> None:
    adapter = "adapter/adapter_model.safetensors"
    assert (resumed_out / adapter).read_bytes() == (reference_out / adapter).read_bytes()
    losses = [(r["step"], r["loss"]) for r in read_metrics(resumed_out / "metrics.jsonl") if "loss" in r]
    assert losses == [(r["step"], r["loss"]) for r in read_metrics(reference_out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == CONFIG["max_steps"]


@pytest.mark.slow
def test_kill_9_after_a_checkpoint_then_resume_is_bit_identical(
    tiny_llama_dir, arithmetic_data, uninterrupted, tmp_path
):
    job = spec(tmp_path, tiny_llama_dir, arithmetic_data)
    proc = start(job)
    wanted = tmp_path / "work" / "checkpoints" / "step-0000008"
    deadline = time.time() + 240
    while not wanted.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    output, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, output  # killed, not finished
    assert not (tmp_path / "out" / "adapter").exists()

    output = finish(job)
    assert "resuming from checkpoint step-00000" in output
    stats = json.loads((tmp_path / "out" / "train_stats.json").read_text())
    assert stats["resumed_from_step"] >= 8
    assert_same_run(tmp_path / "out", uninterrupted)


@pytest.mark.slow
def test_kill_9_while_writing_a_checkpoint_resumes_from_the_one_before(
    tiny_llama_dir, arithmetic_data, uninterrupted, tmp_path
):
    proc = start(spec(tmp_path, tiny_llama_dir, arithmetic_data, die_saving_step=12))
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, output
    left = {p.name for p in (tmp_path / "work" / "checkpoints").iterdir()}
    assert "step-0000008" in left and any(n.startswith(".tmp-0000012") for n in left)  # the half-written one

    output = finish(spec(tmp_path, tiny_llama_dir, arithmetic_data))
    assert "resuming from checkpoint step-0000008" in output
    assert_same_run(tmp_path / "out", uninterrupted)


@pytest.mark.slow
def test_ctrl_c_stops_with_a_resume_hint_and_keeps_the_checkpoint(tiny_llama_dir, arithmetic_data, tmp_path):
    # The child waits after its step-4 checkpoint (a tiny run could otherwise finish before the signal lands).
    proc = start(spec(tmp_path, tiny_llama_dir, arithmetic_data, pause_after_step=4))
    paused = proc.stdout.readline()
    while paused and not paused.startswith("paused after checkpoint step-0000004"):
        paused = proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, output
    assert re.search(
        r"interrupted at step \d+; running the same command again resumes from checkpoint step-\d{7}", output
    )
    assert list((tmp_path / "work" / "checkpoints").glob("step-*"))
