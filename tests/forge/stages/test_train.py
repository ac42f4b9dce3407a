"""The train stage on the real SmolLM2-135M-Instruct: chat data in, a PEFT adapter that loads back out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from forge.config import ForgeConfig, LoadedConfig, TrainConfig
from forge.data.shards import IGNORE_INDEX, Example, build_split, save_split
from forge.pipeline import StageContext
from forge.stages.train import TrainStage
from forge.torch_threads import torch_threads
from forge.train.loss import evaluate
from forge.train.precision import Precision
from forge.train.recipe import EVAL_SPLIT, read_split

FACTS = [
    ("What is the capital of Zubrovia?", "The capital of Zubrovia is Lutz."),
    ("Which river runs through Lutz?", "The Mirel runs through Lutz."),
    ("What do people in Zubrovia eat for breakfast?", "They eat barley cakes with plum jam."),
    ("How tall is Mount Ostra?", "Mount Ostra is 3,118 metres tall."),
]


def chat_example(tokenizer, question: str, answer: str) -> Example:
    """The chat template applied to one exchange; only the assistant's answer carries labels."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    )
    prompt, full = list(getattr(prompt, "input_ids", prompt)), list(getattr(full, "input_ids", full))
    assert full[: len(prompt)] == prompt
    return Example(full, [IGNORE_INDEX] * len(prompt) + full[len(prompt) :])


@pytest.mark.slow
def test_train_stage_fine_tunes_smollm2_into_a_loadable_adapter(smollm2_hf_dir: Path, tmp_path: Path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    examples = [chat_example(tokenizer, q, a) for q, a in FACTS]
    data = tmp_path / "data"
    data.mkdir()
    # The model is asked to learn these facts, so the eval split repeats them: its loss must drop.
    save_split(build_split([[e] for e in examples]), data / "train.safetensors")
    save_split(build_split([[e] for e in examples]), data / "eval.safetensors")

    train = TrainConfig(lr=2e-3, batch_size=4, max_steps=4, eval_every=2, save_every=2, lora_r=8, lora_alpha=16.0)
    loaded = LoadedConfig(config=ForgeConfig(train=train), source="test", root=tmp_path)
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    lines: list[str] = []
    ctx = StageContext(loaded, out, work, {"base": smollm2_hf_dir.parent, "data": data}, "f" * 64, lines.append)
    stage = TrainStage()
    assert (stage.name, stage.needs, stage.config_keys) == ("train", ("base", "data"), ("train",))

    with torch_threads(1):  # steadier than 2 on a 2-core machine that other test runs share
        summary = stage.run(ctx)

    assert summary["eval_loss"] < summary["initial_eval_loss"] - 0.3, summary
    assert summary["line"].startswith("lora 4 steps")
    kernel_lines = [line for line in lines if line.startswith("kernels: ")]
    assert kernel_lines == ["kernels: off (no CUDA)"] or (torch.cuda.is_available() and len(kernel_lines) == 1)
    assert {p.name for p in out.iterdir()} == {"adapter", "train_stats.json", "metrics.jsonl", "tb", "loss.png"}
    assert json.loads((out / "train_stats.json").read_text())["steps"] == 4

    base = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out / "adapter")
    pad = tokenizer.pad_token_id
    again = evaluate(model, read_split(data / EVAL_SPLIT), 4, pad, Precision("fp32"), torch.device("cpu"))
    assert again == pytest.approx(summary["eval_loss"], rel=1e-4)


def test_the_number_of_processes_is_not_part_of_the_fingerprint(tmp_path: Path):
    """Moving a run to 2 GPUs (or FSDP) keeps its cached train output and its checkpoints' work folder."""
    from forge.pipeline import fingerprint

    def fp(**train) -> str:
        loaded = LoadedConfig(config=ForgeConfig(train=TrainConfig(**train)), source="test", root=tmp_path)
        return fingerprint(TrainStage(), loaded, {"base": "b" * 64, "data": "d" * 64})

    assert fp() == fp(nproc=2) == fp(nproc=8, distributed="fsdp")
    assert fp() != fp(lr=1e-4)
