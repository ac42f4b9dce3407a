"""On a CUDA machine: QLoRA of a 1.1B-parameter Llama-architecture model trains in bf16 and its adapter loads
with PEFT. Prints tokens/s and peak memory (run with -s to see them)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from forge.config import TrainConfig
from forge.train.loss import evaluate
from forge.train.model import qlora_quantization
from forge.train.precision import Precision
from forge.train.recipe import EVAL_SPLIT, read_split, run_training

from .synthetic import arithmetic_examples, write_data

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# TinyLlama-1.1B's shape with random weights: no download, real sizes for throughput and memory.
LLAMA_1B = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-1b")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def test_qlora_trains_a_1b_llama_in_bf16_and_the_adapter_loads_with_peft(llama_1b, tmp_path):
    # ~40 examples packed per sequence: sequences of about 500 tokens.
    data = write_data(tmp_path / "data", arithmetic_examples(1600, seed=1), arithmetic_examples(160, seed=2), pack=40)
    cfg = TrainConfig(method="qlora", lr=1e-3, batch_size=8, max_steps=30, eval_every=10, save_every=10)
    out = tmp_path / "out"
    out.mkdir()
    stats = run_training(llama_1b, data, cfg, out, tmp_path / "work", log=print, show_progress=False)
    print(json.dumps({k: stats[k] for k in ("tokens_per_s", "peak_memory_mib", "device", "precision")}))
    assert stats["precision"] in ("bf16", "fp16") and stats["peak_memory_kind"] == "cuda_max_allocated"
    assert stats["eval_loss"] < stats["initial_eval_loss"]

    quant = qlora_quantization(torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(llama_1b, quantization_config=quant, device_map={"": "cuda:0"})
    model = PeftModel.from_pretrained(base, out / "adapter")
    precision = Precision(stats["precision"])
    again = evaluate(model, read_split(data / EVAL_SPLIT), 8, 0, precision, torch.device("cuda", 0))
    assert again == pytest.approx(stats["eval_loss"], rel=2e-2)


@pytest.mark.parametrize(
    "precision, optimizer, checkpointing",
    [("fp16", "adamw8bit", "offload"), ("bf16", "adamw", "full"), ("auto", "adamw", "auto")],
)
def test_precisions_optimizers_and_memory_modes_train_on_gpu(
    precision, optimizer, checkpointing, tiny_llama_dir, arithmetic_data, small_config, tmp_path
):
    cfg = small_config(
        precision=precision, optimizer=optimizer, gradient_checkpointing=checkpointing, max_steps=12, lr=1e-2
    )
    out = tmp_path / "out"
    out.mkdir()
    lines: list[str] = []
    stats = run_training(tiny_llama_dir, arithmetic_data, cfg, out, tmp_path / "work", log=lines.append)
    assert stats["precision"] == ("bf16" if precision == "auto" else precision)
    expected = {"offload": "offload", "full": "full", "auto": "none"}[checkpointing]
    assert any(line.startswith(f"activation checkpointing: {expected} ") for line in lines)
    assert stats["eval_loss"] < stats["initial_eval_loss"] - 0.1
