"""Every supported architecture converts to an f16 GGUF whose llama.cpp logits match HF's."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from forge.converters import SUPPORTED_ARCHITECTURES, ConversionError, convert_hf_to_gguf
from forge.converters import architectures as arch_table
from safetensors import safe_open

from .tiny_models import (
    PADDED_VOCAB,
    SMALL_VOCAB,
    TINY_CASES,
    agreement,
    build_tiny_gemma3_multimodal,
    chat_token_ids,
    hf_logits,
    llama_cpp_logits,
    read_back,
)

ARCH_KEYS = (
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.layer_norm_rms_epsilon",
    "rope.freq_base",
    "rope.dimension_count",
    "vocab_size",
)
GENERAL_KEYS = ("general.architecture", "general.name", "general.file_type", "general.quantization_version")
TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
)
# keys and tensors each case's family needs on top of the common ones
EXTRA_KEYS = {
    "gemma2": (
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "attention.sliding_window",
        "attention.sliding_window_pattern",
    ),
    "gemma3": (
        "final_logit_softcapping",
        "attention.sliding_window",
        "attention.sliding_window_pattern",
        "rope.freq_base_swa",
        "rope.scaling.type",
        "rope.scaling.factor",
    ),
    "phi-longrope": ("rope.scaling.original_context_length", "rope.scaling.attn_factor"),
}
EXTRA_TENSORS = {
    "llama3": ("rope_freqs.weight",),
    "phi-longrope": ("rope_factors_long.weight", "rope_factors_short.weight"),
}
MAX_KL = 1e-3
MIN_TOP1 = 0.99


def hf_shapes(hf_dir: Path) -> Counter:
    """Shapes of the HF tensors llama.cpp needs (a tied lm_head is the embedding again)."""
    config = json.loads((hf_dir / "config.json").read_text())
    shapes: Counter = Counter()
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            if name == "lm_head.weight" and config.get("tie_word_embeddings", True):
                continue
            shapes[tuple(f.get_slice(name).get_shape())] += 1
    return shapes


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_tiny_model_f16_gguf_matches_hf(case: str, tiny_model, tmp_path: Path) -> None:
    hf_dir = tiny_model(case)
    result = convert_hf_to_gguf(hf_dir, tmp_path / "model-f16.gguf")
    config = json.loads((hf_dir / "config.json").read_text())

    fields, tensors = read_back(result.path)
    arch = result.gguf_architecture
    expected_keys = GENERAL_KEYS + TOKENIZER_KEYS + tuple(f"{arch}.{k}" for k in ARCH_KEYS + EXTRA_KEYS.get(case, ()))
    assert not [k for k in expected_keys if k not in fields], "metadata incomplete"
    assert fields[f"{arch}.block_count"] == config["num_hidden_layers"]
    assert fields[f"{arch}.vocab_size"] == PADDED_VOCAB == len(fields["tokenizer.ggml.tokens"])
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    extra = EXTRA_TENSORS.get(case, ())
    assert all(name in tensors for name in extra)
    assert Counter(shape for name, (shape, _) in tensors.items() if name not in extra) == hf_shapes(hf_dir)
    assert len(tensors) == result.tensor_count
    assert {t for shape, t in tensors.values() if len(shape) == 1} == {"F32"}
    assert {t for shape, t in tensors.values() if len(shape) == 2} == {"F16"}

    ids = chat_token_ids(hf_dir)
    top1, kl = agreement(hf_logits(hf_dir, ids), llama_cpp_logits(result.path, ids))
    assert top1 >= MIN_TOP1 and kl < MAX_KL, f"{case}: top-1 {top1:.4f}, mean KL {kl:.2e} over {len(ids)} tokens"


def test_gemma3_image_text_checkpoint_converts_its_text_tower(small_tokenizer_dir: Path, tmp_path: Path) -> None:
    hf_dir = build_tiny_gemma3_multimodal(tmp_path / "gemma3-mm", small_tokenizer_dir)
    result = convert_hf_to_gguf(hf_dir, tmp_path / "model-f16.gguf")
    _, tensors = read_back(result.path)
    assert result.gguf_architecture == "gemma3"
    assert not [name for name in tensors if not name.startswith(("blk.", "token_embd", "output_norm"))]
    ids = chat_token_ids(hf_dir)
    top1, kl = agreement(hf_logits(hf_dir, ids), llama_cpp_logits(result.path, ids))
    assert top1 >= MIN_TOP1 and kl < MAX_KL, (top1, kl)


@pytest.mark.slow
def test_smollm2_f16_gguf_matches_hf(smollm2_hf_dir: Path, smollm2_f16, smollm2_f16_read_back) -> None:
    config = json.loads((smollm2_hf_dir / "config.json").read_text())
    fields, tensors = smollm2_f16_read_back
    assert not [k for k in GENERAL_KEYS + TOKENIZER_KEYS + tuple(f"llama.{k}" for k in ARCH_KEYS) if k not in fields]
    assert (fields["llama.block_count"], fields["llama.attention.head_count_kv"], fields["llama.vocab_size"]) == (
        config["num_hidden_layers"],
        config["num_key_value_heads"],
        config["vocab_size"],
    )
    assert "output.weight" not in tensors  # tied embeddings: llama.cpp reuses token_embd
    assert Counter(shape for shape, _ in tensors.values()) == hf_shapes(smollm2_hf_dir)
    ids = chat_token_ids(smollm2_hf_dir)
    top1, kl = agreement(hf_logits(smollm2_hf_dir, ids), llama_cpp_logits(smollm2_f16.path, ids))
    assert top1 >= MIN_TOP1 and kl < MAX_KL, f"SmolLM2: top-1 {top1:.4f}, mean KL {kl:.2e} over {len(ids)} tokens"


def test_wrong_qk_permutation_is_caught_by_the_logit_check(tiny_model, tmp_path: Path, monkeypatch) -> None:
    """The fidelity check has teeth: Llama Q/K rows left in HF's layout load fine but fail it."""
    llama = arch_table.ARCHITECTURES["LlamaForCausalLM"]
    monkeypatch.setitem(arch_table.ARCHITECTURES, "LlamaForCausalLM", dataclasses.replace(llama, permute_qk=False))
    hf_dir = tiny_model("llama")
    result = convert_hf_to_gguf(hf_dir, tmp_path / "unpermuted.gguf")
    ids = chat_token_ids(hf_dir)
    top1, kl = agreement(hf_logits(hf_dir, ids), llama_cpp_logits(result.path, ids))
    assert kl > 10 * MAX_KL and top1 < MIN_TOP1


def test_f32_output_loads_and_matches(tiny_model, tmp_path: Path) -> None:
    hf_dir = tiny_model("qwen3", dtype="bfloat16")
    result = convert_hf_to_gguf(hf_dir, tmp_path / "model-f32.gguf", out_type="f32")
    fields, tensors = read_back(result.path)
    assert {t for _, t in tensors.values()} == {"F32"} and fields["general.file_type"] == 0
    ids = chat_token_ids(hf_dir)
    top1, kl = agreement(hf_logits(hf_dir, ids), llama_cpp_logits(result.path, ids))
    assert top1 >= MIN_TOP1 and kl < MAX_KL, (top1, kl)


def test_bf16_output_keeps_bf16_weights_bit_exact(tiny_model, tmp_path: Path) -> None:
    """A bf16 model converts to bf16 losslessly; llama.cpp then runs it (its CPU bf16 matmul rounds the
    activations to bf16 too, so only the KL bound applies, not the f16 top-1 bound)."""
    hf_dir = tiny_model("qwen3", dtype="bfloat16")
    result = convert_hf_to_gguf(hf_dir, tmp_path / "model-bf16.gguf", out_type="bf16")
    fields, tensors = read_back(result.path)
    assert {t for shape, t in tensors.values() if len(shape) == 2} == {"BF16"} and fields["general.file_type"] == 32
    stored = {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(result.path).tensors}
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        for hf_name, gguf_name in (
            ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight"),
            ("model.embed_tokens.weight", "token_embd.weight"),
        ):
            assert stored[gguf_name] == f.get_tensor(hf_name).view(torch.int16).numpy().tobytes()
    ids = chat_token_ids(hf_dir)
    _, kl = agreement(hf_logits(hf_dir, ids), llama_cpp_logits(result.path, ids))
    assert kl < MAX_KL, kl


def test_result_and_metadata_record_what_was_written(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "nested" / "model.gguf"
    typed = {"general.base_model.count": 1, "general.tags": ["a", "b"], "forge.x.ok": True, "forge.x.f": 0.5}
    metadata = {"name": "my-finetune", "license": "apache-2.0", **typed}
    result = convert_hf_to_gguf(tiny_model("qwen2"), out, metadata=metadata)
    fields, _ = read_back(out)
    assert (fields["general.name"], fields["general.license"]) == ("my-finetune", "apache-2.0")
    assert {k: fields[k] for k in typed} == typed
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.base_model.count"].types == [gguf.GGUFValueType.UINT32]
    assert result.size_bytes == out.stat().st_size
    assert result.tokenizer_model == "gpt2" and result.vocab_size == PADDED_VOCAB
    assert [p.name for p in out.parent.iterdir()] == ["model.gguf"]  # no temporary file left behind
    assert result.to_dict()["path"] == str(out)


def test_unsupported_architecture_is_one_clear_error(tiny_model, tmp_path: Path) -> None:
    hf_dir = tmp_path / "bert"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(ConversionError) as err:
        convert_hf_to_gguf(hf_dir, tmp_path / "bert.gguf")
    message = str(err.value)
    assert "BertForMaskedLM" in message and str(hf_dir / "config.json") in message
    assert all(name in message for name in SUPPORTED_ARCHITECTURES)
    assert "\n" not in message
    assert not (tmp_path / "bert.gguf").exists()


def test_bad_inputs_name_the_file(tiny_model, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="config.json: not found"):
        convert_hf_to_gguf(tmp_path, tmp_path / "x.gguf")
    with pytest.raises(ConversionError, match="out_type 'q4_k_m'"):
        convert_hf_to_gguf(tiny_model("llama"), tmp_path / "x.gguf", out_type="q4_k_m")
    with pytest.raises(ConversionError, match="metadata keys \\['colour'\\]"):
        convert_hf_to_gguf(tiny_model("llama"), tmp_path / "x.gguf", metadata={"colour": "blue"})
    reserved = {"general.file_type": 1, "llama.block_count": 3}
    with pytest.raises(ConversionError, match=r"keys \['general.file_type', 'llama.block_count'\] are written"):
        convert_hf_to_gguf(tiny_model("llama"), tmp_path / "x.gguf", metadata=reserved)
    with pytest.raises(ConversionError, match=r"metadata 'forge.config': a dict is not a GGUF value"):
        convert_hf_to_gguf(tiny_model("llama"), tmp_path / "x.gguf", metadata={"forge.config": {"lr": 1}})


def test_a_name_llama_cpp_treats_as_phi3_needs_phi3_tokens(tiny_model, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="general.name 'my-phi3-tune' makes llama.cpp expect Phi-3's tokens"):
        convert_hf_to_gguf(tiny_model("phi"), tmp_path / "x.gguf", metadata={"name": "my-phi3-tune"})


def test_every_table_entry_is_a_tensor_its_gguf_architecture_has() -> None:
    for hf_name, spec in arch_table.ARCHITECTURES.items():
        allowed = set(gguf.MODEL_TENSORS[spec.gguf_arch])
        used = set(spec.block_tensors.values()) | set(arch_table.GLOBAL_TENSORS.values())
        if not spec.has_output_tensor:
            used.discard(gguf.MODEL_TENSOR.OUTPUT)
        assert used <= allowed, f"{hf_name}: {sorted(t.name for t in used - allowed)}"


def test_tokenizer_larger_than_the_embedding_is_refused(tiny_model, tmp_path: Path) -> None:
    hf_dir = tmp_path / "small-vocab"
    source = tiny_model("llama")
    hf_dir.mkdir()
    for f in source.iterdir():
        (hf_dir / f.name).write_bytes(f.read_bytes())
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "vocab_size": SMALL_VOCAB - 1}))
    # the embedding itself keeps its rows: rewrite it with fewer rows than the tokenizer has tokens
    from safetensors.torch import load_file, save_file

    weights = load_file(hf_dir / "model.safetensors")
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][: SMALL_VOCAB - 1].clone()
    weights["lm_head.weight"] = weights["lm_head.weight"][: SMALL_VOCAB - 1].clone()
    save_file(weights, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ConversionError, match=f"{SMALL_VOCAB} tokens but the model's embedding has {SMALL_VOCAB - 1} rows"
    ):
        convert_hf_to_gguf(hf_dir, tmp_path / "x.gguf")
