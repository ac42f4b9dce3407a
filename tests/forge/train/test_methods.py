"""Each method trains (eval loss drops) and leaves an output that PEFT / transformers load back exactly."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from forge.train.batches import make_batch
from forge.train.loss import evaluate, summed_loss
from forge.train.model import load_model
from forge.train.precision import Precision
from forge.train.recipe import EVAL_SPLIT, read_split, run_training

CPU = torch.device("cpu")
FP32 = Precision("fp32")


def short_names(targets: list[str]) -> set[str]:
    """PEFT records target modules either by short name or by full path."""
    return {t.rsplit(".", 1)[-1] for t in targets}


def train(tiny_llama_dir, arithmetic_data, small_config, tmp_path, **overrides):
    out = tmp_path / "out"
    out.mkdir()
    lines: list[str] = []
    stats = run_training(
        tiny_llama_dir, arithmetic_data, small_config(**overrides), out, tmp_path / "work", log=lines.append
    )
    return out, stats, lines


@pytest.mark.parametrize("method", ["lora", "rslora", "qlora"])
def test_adapter_loads_with_peft_and_reproduces_the_final_eval_loss(
    method, tiny_llama_dir, arithmetic_data, small_config, tmp_path, nf4_base
):
    out, stats, lines = train(tiny_llama_dir, arithmetic_data, small_config, tmp_path, method=method)
    assert stats["eval_loss"] < stats["initial_eval_loss"] - 0.05
    kernel_lines = [line for line in lines if line.startswith("kernels: ")]
    assert kernel_lines == ["kernels: off (no CUDA)"] or (torch.cuda.is_available() and len(kernel_lines) == 1)

    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_rslora"] is (method == "rslora")
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert short_names(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }

    base = nf4_base(tiny_llama_dir) if method == "qlora" else AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    loaded = PeftModel.from_pretrained(base, adapter)
    if method == "rslora":
        assert loaded.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(8.0 / 2)
    eval_loss = evaluate(loaded, read_split(arithmetic_data / EVAL_SPLIT), 8, 0, FP32, CPU)
    assert eval_loss == pytest.approx(stats["eval_loss"], rel=1e-5)


def test_full_fine_tune_writes_a_model_folder_that_transformers_loads(
    tiny_llama_dir, arithmetic_data, small_config, tmp_path
):
    out, stats, _ = train(tiny_llama_dir, arithmetic_data, small_config, tmp_path, method="full", lr=1e-3)
    assert not (out / "adapter").exists()
    assert stats["trainable_parameters"] == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(out / "model").parameters()
    )
    assert stats["eval_loss"] < stats["initial_eval_loss"] - 0.1
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    eval_loss = evaluate(model, read_split(arithmetic_data / EVAL_SPLIT), 8, 0, FP32, CPU)
    assert eval_loss == pytest.approx(stats["eval_loss"], rel=1e-5)


def test_named_target_modules_get_adapters_and_nothing_else(tiny_llama_dir, arithmetic_data, small_config, tmp_path):
    out, _, _ = train(
        tiny_llama_dir, arithmetic_data, small_config, tmp_path, target_modules=["q_proj", "v_proj"], max_steps=1
    )
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert short_names(config["target_modules"]) == {"q_proj", "v_proj"}


def test_unknown_target_module_is_a_one_line_error_naming_the_key(
    tiny_llama_dir, arithmetic_data, small_config, tmp_path
):
    with pytest.raises(ValueError, match=r"^train\.target_modules: 'qproj' is no linear layer .*q_proj") as err:
        train(tiny_llama_dir, arithmetic_data, small_config, tmp_path, target_modules=["qproj"])
    assert "\n" not in str(err.value)


def test_missing_split_names_the_file(tiny_llama_dir, small_config, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train\.safetensors: split not found"):
        run_training(tiny_llama_dir, tmp_path, small_config(), tmp_path / "out", tmp_path / "work")


def test_qlora_gradients_stay_right_after_an_evaluation(tiny_llama_dir, arithmetic_data, small_config):
    """bitsandbytes repacks NF4 weights for a CPU kernel without backward in eval mode; Forge prevents it."""
    model = load_model(tiny_llama_dir, small_config(method="qlora"), FP32, CPU, log=lambda _: None)
    split = read_split(arithmetic_data / EVAL_SPLIT)
    batch = make_batch(split, list(range(4)), pad_id=0)

    def lora_grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        summed_loss(model, batch, FP32, CPU).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = lora_grads()
    evaluate(model, split, 8, 0, FP32, CPU)
    after = lora_grads()
    assert any(g.abs().sum() > 0 for n, g in before.items() if "layers.0." in n)
    for name, grad in before.items():
        torch.testing.assert_close(after[name], grad, msg=name)
