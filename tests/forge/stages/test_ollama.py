"""The gguf and ollama stages in ollama.mode adapter, run by the pipeline on the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from forge.converters import ConversionError
from forge.modelfiles import validate
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from forge.config import ForgeConfig, LoadedConfig, load_config
from forge.pipeline import Pipeline, Stage, StageContext
from forge.stages.base import BaseStage
from forge.stages.data import DataStage
from forge.stages.gguf import GgufStage, adapter_over_base
from forge.stages.merge import MergeStage
from forge.stages.ollama import OllamaStage, _with_absolute_paths
from forge.stages.push import PushStage, plan_push
from forge.stages.quantize import QuantizeStage

CHAT = [
    {"role": "user", "content": "Name three colors, and tell me what 12 + 30 is."},
    {"role": "assistant", "content": "Red, green and blue. 12 + 30 = 42."},
    {"role": "user", "content": "Write a Python function that squares a number, then say it in French."},
    {"role": "assistant", "content": "def square(x):\n    return x * x\n\nEn français : « élever au carré »."},
    {"role": "user", "content": "Which river runs through Paris, and how long is it?"},
    {"role": "assistant", "content": "The Seine runs through Paris; it is about 777 kilometres long."},
]


class TrainedAdapter(Stage):
    """The train stage's output as after training: a PEFT LoRA on every linear layer with non-zero lora_B."""

    name, needs, config_keys = "train", ("base", "data"), ("train",)

    def run(self, ctx: StageContext) -> dict:
        cfg = ctx.config.train
        model = AutoModelForCausalLM.from_pretrained(ctx.inputs["base"] / "model", dtype=torch.float32)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")
        torch.manual_seed(0)  # PEFT draws lora_A from torch's global generator
        peft_model = get_peft_model(model, lora)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.03)
        peft_model.save_pretrained(ctx.out / "adapter")
        (ctx.out / "train_stats.json").write_text(json.dumps({"method": cfg.method}))
        return {"line": "fixture adapter"}


class NoEval(Stage):
    """The eval stage's place in the pipeline, with an empty report (its gate is tested in tests/forge/eval)."""

    name, needs = "eval", ("base", "data", "merge", "quantize", "gguf")

    def run(self, ctx: StageContext) -> dict:
        (ctx.out / "report.json").write_text("{}")
        return {"line": "skipped"}


def llama_cpp_logits(gguf: Path, ids: list[int], lora: Path | None = None) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), lora_path=str(lora) if lora else None, logits_all=True, n_ctx=512,
                          n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_and_top1(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """Mean KL(reference || candidate) over positions, and top-1 agreement."""
    p, q = log_softmax(reference), log_softmax(candidate)
    kl = float((np.exp(p) * (p - q)).sum(-1).mean())
    return kl, float((reference.argmax(-1) == candidate.argmax(-1)).mean())


@pytest.mark.slow
def test_adapter_mode_writes_a_modelfile_whose_base_and_adapter_equal_the_merged_gguf(smollm2_hf_dir, tmp_path):
    settings = [
        f"run.dir={tmp_path / 'runs'}",
        f"base.model={smollm2_hf_dir}",
        "train.lora_r=8",
        "train.lora_alpha=16",
        "export.quants=[q8_0]",
        "ollama.quant=q8_0",
        "ollama.mode=adapter",
        "ollama.parameters={temperature: 0.3}",
    ]
    loaded = load_config(None, settings)
    stages = [BaseStage(), DataStage(), TrainedAdapter(), MergeStage(), GgufStage(), QuantizeStage(), NoEval(),
              OllamaStage()]
    lines: list[str] = []
    pipe = Pipeline(loaded, stages, log=lines.append)
    pipe.run("ollama")
    run = pipe.run_dir

    facts = json.loads((run / "gguf" / "gguf.json").read_text())["adapter_mode"]
    assert (facts["adapter"], facts["base"], facts["ranks"], facts["alpha"]) == (
        "adapter-f16.gguf", "base-f16.gguf", [8], 16.0
    )
    assert facts["modules"] == 7 * 30  # q, k, v, o, gate, up, down in each of SmolLM2's 30 layers
    assert any("adapter-f16.gguf (210 LoRA modules) over base-f16.gguf" in line for line in lines)

    modelfile = run / "ollama" / "adapter.Modelfile"
    mf = validate(modelfile.read_text(), str(modelfile))
    assert (modelfile.parent / mf.model).resolve() == (run / "gguf" / "base-f16.gguf").resolve()
    assert (modelfile.parent / mf.adapter).resolve() == (run / "gguf" / "adapter-f16.gguf").resolve()
    assert mf.stops == ["<|im_end|>"] and dict(mf.parameters)["temperature"] == 0.3
    merged_mf = validate((run / "ollama" / "q8_0.Modelfile").read_text())
    assert merged_mf.template == mf.template and merged_mf.adapter is None
    ollama = json.loads((run / "ollama" / "ollama.json").read_text())
    assert ollama["command"] == f"ollama create default -f {modelfile}"

    # what `ollama create` gets (written before the stage folder is in place): the same Modelfile, absolute paths
    created = validate(_with_absolute_paths(modelfile.read_text(), run))
    assert Path(created.model) == run / "gguf" / "base-f16.gguf" and Path(created.adapter).is_file()
    assert created.template == mf.template

    # llama.cpp: the base GGUF with the adapter computes what the merged model's f16 GGUF computes
    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    ids = tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    merged = llama_cpp_logits(run / "gguf" / "model-f16.gguf", ids)
    base_gguf, adapter_gguf = run / "gguf" / "base-f16.gguf", run / "gguf" / "adapter-f16.gguf"
    kl, top1 = kl_and_top1(merged, llama_cpp_logits(base_gguf, ids, adapter_gguf))
    base_kl, _ = kl_and_top1(merged, llama_cpp_logits(base_gguf, ids))
    print(f"SmolLM2 adapter mode over {len(ids)} tokens: top-1 {top1:.4f}, KL {kl:.2e}; base alone KL {base_kl:.3f}; "
          f"adapter {facts['adapter_size'] / 2**20:.1f} MiB, base {facts['base_size'] / 2**20:.1f} MiB")
    assert top1 >= 0.99 and kl < 1e-3, (top1, kl)
    assert base_kl > 1e-2, base_kl

    # the push stage uploads the adapter and base GGUFs and a Modelfile pointed at them, in one folder
    inputs = {name: run / name for name in PushStage.needs}
    plan = plan_push(loaded, inputs, tmp_path / "push", "alice/smol-GGUF")
    assert plan.card.modelfiles == ["Q8_0.Modelfile"] and plan.card.adapter_mode.modelfile == "ollama-adapter/Modelfile"
    assert [plan.sources[f"ollama-adapter/{k}.gguf"] for k in ("adapter", "base")] == [
        "gguf/adapter-f16.gguf",
        "gguf/base-f16.gguf",
    ]
    pushed = validate((tmp_path / "push" / "adapter.Modelfile").read_text())
    assert (pushed.model, pushed.adapter) == ("./base.gguf", "./adapter.gguf")
    assert pushed.template == mf.template and pushed.stops == mf.stops


def context(tmp_path: Path, base_config: dict, adapter: bool = True) -> StageContext:
    """A gguf-stage context whose base folder holds only config.json (the checks run before any conversion)."""
    (tmp_path / "base" / "model").mkdir(parents=True)
    (tmp_path / "base" / "model" / "config.json").write_text(json.dumps(base_config))
    (tmp_path / "train").mkdir()
    if adapter:
        (tmp_path / "train" / "adapter").mkdir()
    loaded = LoadedConfig(config=ForgeConfig(), source="test", root=tmp_path)
    inputs = {"base": tmp_path / "base", "train": tmp_path / "train"}
    return StageContext(loaded, tmp_path / "out", tmp_path / "work", inputs, "f" * 64, print)


QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256}


@pytest.mark.parametrize(
    ("base_config", "adapter", "message"),
    [
        (QWEN3, True, "Ollama runs qwen3 models on its own engine, which does not load LoRA adapters"),
        ({**QWEN3, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}, True,
         "the base model is bitsandbytes-quantized, with no 16-bit weights"),
        ({**QWEN3, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}, False,
         "train/adapter: missing; ollama.mode adapter needs the train stage's LoRA adapter"),
    ],
)
def test_adapter_mode_refusals_are_one_line(tmp_path, base_config, adapter, message):
    with pytest.raises(ConversionError) as error:
        adapter_over_base(context(tmp_path, base_config, adapter), "f16", {})  # refused before provenance is read
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
