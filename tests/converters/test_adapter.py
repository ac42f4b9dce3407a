"""A PEFT LoRA as a llama.cpp adapter GGUF: base f16 GGUF + adapter in llama.cpp == the merged model's f16 GGUF."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from forge.converters import ConversionError, convert_hf_to_gguf, convert_lora_to_gguf
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from .tiny_models import TOKENIZER_FILES, agreement, chat_token_ids, read_back

MAX_KL = 1e-3
MIN_TOP1 = 0.99
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_like_adapter(hf_dir: Path, out: Path, b_std: float = 0.05, **lora: object) -> tuple[Path, Path]:
    """A PEFT adapter on hf_dir with random non-zero lora_B (as after training), and the PEFT-merged model.

    Returns (adapter folder, merged HF folder in f16 with the base's tokenizer).
    """
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    torch.manual_seed(0)  # PEFT draws lora_A from torch's global generator
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * b_std)
    peft_model.save_pretrained(out / "adapter")
    merged = peft_model.merge_and_unload()
    merged.to(torch.float16).save_pretrained(out / "merged")
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out / "merged" / name)
    return out / "adapter", out / "merged"


def llama_cpp_logits(gguf_path: Path, ids: list[int], lora: Path | None = None) -> np.ndarray:
    """Logits at every position from llama.cpp, with a LoRA adapter GGUF applied when given."""
    import llama_cpp

    llm = llama_cpp.Llama(
        str(gguf_path),
        lora_path=str(lora) if lora else None,
        logits_all=True,
        n_ctx=1024,
        n_threads=2,
        verbose=False,
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def check_adapter_equals_merged(hf_dir: Path, tmp_path: Path, **lora: object) -> dict:
    """Convert base, merged model and adapter; compare llama.cpp's logits. Returns the measured numbers."""
    adapter_dir, merged_dir = train_like_adapter(hf_dir, tmp_path, **lora)
    base = convert_hf_to_gguf(hf_dir, tmp_path / "base-f16.gguf").path
    merged = convert_hf_to_gguf(merged_dir, tmp_path / "model-f16.gguf").path
    result = convert_lora_to_gguf(adapter_dir, hf_dir, tmp_path / "adapter-f16.gguf")

    ids = chat_token_ids(hf_dir)
    reference = llama_cpp_logits(merged, ids)
    top1, kl = agreement(reference, llama_cpp_logits(base, ids, lora=result.path))
    base_top1, base_kl = agreement(reference, llama_cpp_logits(base, ids))
    numbers = {"top1": top1, "kl": kl, "base_top1": base_top1, "base_kl": base_kl, "tokens": len(ids)}
    print(f"{hf_dir.name}: {numbers}")
    assert top1 >= MIN_TOP1 and kl < MAX_KL, numbers
    assert base_kl > 10 * MAX_KL, f"the adapter barely changes the model, so the check proves nothing: {numbers}"
    return {"result": result, **numbers}


def test_llama_lora_over_the_base_equals_the_merged_model(tiny_model, tmp_path: Path) -> None:
    """Plain LoRA on every linear layer and the (untied) lm_head; Q/K lora_b rows permuted like the base's."""
    hf_dir = tiny_model("llama")
    checked = check_adapter_equals_merged(hf_dir, tmp_path, r=8, lora_alpha=16, target_modules=[*LINEAR, "lm_head"])
    result = checked["result"]
    assert (result.gguf_architecture, result.alpha, result.ranks, result.rescaled) == ("llama", 16.0, [8], 0)
    assert result.modules == 2 * len(LINEAR) + 1

    fields, tensors = read_back(result.path)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 16.0
    base_fields, base_tensors = read_back(tmp_path / "base-f16.gguf")
    for name, (shape, kind) in tensors.items():
        target, _, part = name.rpartition(".")
        rows, cols = base_tensors[target][0]
        assert shape == ((8, cols) if part == "lora_a" else (rows, 8)) and kind == "F16", name
    assert "output.weight.lora_b" in tensors and "blk.1.attn_k.weight.lora_b" in tensors


def test_wrong_qk_permutation_of_lora_b_is_caught(tiny_model, tmp_path: Path, monkeypatch) -> None:
    """The check has teeth: Llama's lora_b left in HF's row order loads fine but does not match."""
    import dataclasses

    from forge.converters import adapter as adapter_module

    hf_dir = tiny_model("llama")
    adapter_dir, merged_dir = train_like_adapter(hf_dir, tmp_path, r=8, lora_alpha=16, target_modules=["q_proj"])
    base = convert_hf_to_gguf(hf_dir, tmp_path / "base-f16.gguf").path
    merged = convert_hf_to_gguf(merged_dir, tmp_path / "model-f16.gguf").path
    real = adapter_module.load_model_config

    def unpermuted(path: Path):
        cfg = real(path)
        return dataclasses.replace(cfg, spec=dataclasses.replace(cfg.spec, permute_qk=False))

    monkeypatch.setattr(adapter_module, "load_model_config", unpermuted)
    wrong = convert_lora_to_gguf(adapter_dir, hf_dir, tmp_path / "adapter-f16.gguf").path
    ids = chat_token_ids(hf_dir)
    top1, kl = agreement(llama_cpp_logits(merged, ids), llama_cpp_logits(base, ids, lora=wrong))
    assert kl > 10 * MAX_KL, (top1, kl)


def test_rslora_with_rank_and_alpha_patterns(tiny_model, tmp_path: Path) -> None:
    """rsLoRA's alpha/sqrt(r) and per-module ranks/alphas: llama.cpp's alpha/r is corrected inside lora_b."""
    hf_dir = tiny_model("llama")
    checked = check_adapter_equals_merged(
        hf_dir,
        tmp_path,
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules="all-linear",
        rank_pattern={"q_proj": 4, "down_proj": 12},
        alpha_pattern={"v_proj": 5, "k_proj": 40},
    )
    result = checked["result"]
    assert result.ranks == [4, 8, 12]
    assert result.alpha == pytest.approx(16 / 8**0.5 * 8)  # default modules keep lora_b as trained
    assert result.rescaled == 2 * 4  # q, down (rank), v, k (alpha) in each of 2 layers


@pytest.mark.parametrize("case", ["qwen2", "gemma", "phi"])
def test_unpermuted_architectures(case: str, tiny_model, tmp_path: Path) -> None:
    """Qwen2 (q/k/v biases untouched), Gemma (norms + 1 untouched: LoRA is on linear layers only) and Phi-3,
    whose fused qkv_proj / gate_up_proj are one Linear each in HF and one tensor each in the GGUF."""
    hf_dir = tiny_model(case)
    b_std = 0.2 if case == "gemma" else 0.05  # Gemma's scaled embeddings need a larger update to matter as much
    checked = check_adapter_equals_merged(
        hf_dir, tmp_path, b_std=b_std, r=8, lora_alpha=16, target_modules="all-linear"
    )
    if case == "phi":
        _, tensors = read_back(checked["result"].path)
        assert "blk.0.attn_qkv.weight.lora_b" in tensors and "blk.0.ffn_up.weight.lora_b" in tensors


@pytest.mark.slow
def test_smollm2_lora_over_the_base_equals_the_merged_model(smollm2_hf_dir: Path, tmp_path: Path) -> None:
    checked = check_adapter_equals_merged(
        smollm2_hf_dir, tmp_path, b_std=0.03, r=16, lora_alpha=32, target_modules="all-linear"
    )
    assert checked["result"].modules == 7 * 30


def _adapter_folder(tmp_path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}))
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def test_inexpressible_adapters_are_refused_in_one_line(tiny_model, tmp_path: Path) -> None:
    hf_dir = tiny_model("llama")
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    pair = {f"{q}.lora_A.weight": torch.zeros(2, 64), f"{q}.lora_B.weight": torch.zeros(64, 2)}
    cases = [
        ({"use_dora": True}, pair, "use_dora is set; a llama.cpp LoRA adapter cannot express it (DoRA"),
        ({"modules_to_save": ["lm_head"]}, pair, "modules_to_save is set"),
        ({"bias": "all"}, pair, "bias is 'all'"),
        ({"init_lora_weights": "pissa"}, pair, "also changes the base weights"),
        ({}, {**pair, f"{q}.lora_magnitude_vector": torch.ones(64)}, "not a lora_A/lora_B weight"),
        (
            {},
            {
                "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(2, 4160),
                "base_model.model.model.embed_tokens.lora_embedding_B": torch.zeros(64, 2),
            },
            "LoRA on embeddings",
        ),
        ({}, {f"{q}.lora_A.weight": torch.zeros(2, 64)}, "has lora_A but not both"),
        ({}, {f"{q}.lora_A.weight": torch.zeros(2, 32), f"{q}.lora_B.weight": torch.zeros(64, 2)}, "wrong base"),
        ({"r": 4}, pair, "gives it rank 4"),
        (
            {},
            {
                "base_model.model.model.layers.0.input_layernorm.lora_A.weight": torch.zeros(2, 64),
                "base_model.model.model.layers.0.input_layernorm.lora_B.weight": torch.zeros(64, 2),
            },
            "not a linear layer",
        ),
        ({"peft_type": "IA3"}, pair, "peft_type 'IA3' is not LORA"),
        ({}, {**pair, "base_model.model.lm_head.base_layer.weight": torch.zeros(4160, 64)}, "differs from the base"),
    ]
    for config, tensors, message in cases:
        folder = _adapter_folder(tmp_path, config, tensors)
        with pytest.raises(ConversionError) as error:
            convert_lora_to_gguf(folder, hf_dir, tmp_path / "adapter.gguf")
        text = str(error.value)
        assert message in text and "\n" not in text, (config, text)
        assert str(folder) in text
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial*"))


def test_metadata_is_typed_as_the_converter_types_it_and_the_adapter_keys_are_refused(tiny_model, tmp_path) -> None:
    hf_dir = tiny_model("llama")
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    pair = {f"{q}.lora_A.weight": torch.zeros(2, 64), f"{q}.lora_B.weight": torch.zeros(64, 2)}
    folder = _adapter_folder(tmp_path, {}, pair)
    metadata = {"name": "tuned-lora", "general.base_model.count": 1, "forge.dataset.sha256": "d" * 64}
    fields, _ = read_back(convert_lora_to_gguf(folder, hf_dir, tmp_path / "adapter.gguf", metadata=metadata).path)
    assert (fields["general.name"], fields["general.base_model.count"], fields["forge.dataset.sha256"]) == (
        "tuned-lora", 1, "d" * 64
    )
    assert fields["general.type"] == "adapter" and fields["adapter.lora.alpha"] == 4.0
    for key in ("general.type", "adapter.lora.alpha", "general.architecture"):
        with pytest.raises(ConversionError, match=rf"metadata keys \['{key}'\] are written by the adapter converter"):
            convert_lora_to_gguf(folder, hf_dir, tmp_path / "refused.gguf", metadata={key: "x"})
    assert not (tmp_path / "refused.gguf").exists()


def test_lora_on_a_tied_lm_head_is_refused(tiny_model, tmp_path: Path) -> None:
    hf_dir = tiny_model("qwen2")  # tied embeddings: the GGUF has no output tensor to adapt
    head = "base_model.model.lm_head"
    folder = _adapter_folder(
        tmp_path, {}, {f"{head}.lora_A.weight": torch.zeros(2, 64), f"{head}.lora_B.weight": torch.zeros(4160, 2)}
    )
    with pytest.raises(ConversionError, match="has no output tensor"):
        convert_lora_to_gguf(folder, hf_dir, tmp_path / "adapter.gguf")


def test_written_tensors_hold_the_scaled_and_permuted_lora_b(tiny_model, tmp_path: Path) -> None:
    """Read back: lora_a is PEFT's lora_A; lora_b is lora_B * (PEFT scale) / (alpha / r), Q rows permuted."""
    hf_dir = tiny_model("llama")
    adapter_dir, _ = train_like_adapter(
        hf_dir, tmp_path, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]
    )
    result = convert_lora_to_gguf(adapter_dir, hf_dir, tmp_path / "adapter-f32.gguf", out_type="f32")
    peft = load_file(adapter_dir / "adapter_model.safetensors")
    reader = gguf.GGUFReader(result.path)
    data = {t.name: np.array(t.data) for t in reader.tensors}
    prefix = "base_model.model.model.layers.0.self_attn"
    assert np.array_equal(data["blk.0.attn_v.weight.lora_a"], peft[f"{prefix}.v_proj.lora_A.weight"].numpy())
    assert np.array_equal(data["blk.0.attn_v.weight.lora_b"], peft[f"{prefix}.v_proj.lora_B.weight"].numpy())
    b = peft[f"{prefix}.q_proj.lora_B.weight"]
    heads, half = 4, 64 // 4 // 2  # 4 heads of 16 rows: HF [first halves | second halves] -> adjacent pairs
    permuted = b.reshape(heads, 2, half, 4).transpose(1, 2).reshape(64, 4)
    np.testing.assert_allclose(data["blk.0.attn_q.weight.lora_b"], permuted.numpy(), rtol=1e-6)
    assert result.alpha == pytest.approx(8 / 2 * 4) and result.rescaled == 0
