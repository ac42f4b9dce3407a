"""Merging a LoRA adapter gives the same model as PEFT applying it: every supported architecture, the real
SmolLM2, 16/32-bit and NF4 bases."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from forge.models.merge import MergeError, merge_into
from forge.train.model import qlora_quantization


def _load_converter_tiny_models():
    """tests/converters/tiny_models.py by path (--import-mode=importlib: test folders are not packages)."""
    path = Path(__file__).parents[2] / "converters" / "tiny_models.py"
    spec = importlib.util.spec_from_file_location("converter_tiny_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ctm = _load_converter_tiny_models()

TINY = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def _base(path, shard=None):
    torch.manual_seed(0)
    LlamaForCausalLM(TINY).save_pretrained(path, max_shard_size=shard or "2GB")
    return path


def _adapter(model, path, **lora):
    torch.manual_seed(2)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False, **lora))
    peft_model.save_pretrained(path)
    return peft_model


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("lora", [{}, {"use_rslora": True}, {"rank_pattern": {"down_proj": 2}}])
def test_merged_logits_equal_peft_logits(tmp_path, lora):
    base = _base(tmp_path / "base", shard="100KB")
    assert len(list(base.glob("*.safetensors"))) > 1  # the streaming path over several shards
    peft_model = _adapter(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter", **lora)
    facts = merge_into(base, tmp_path / "adapter", tmp_path / "merged")
    assert facts["merged_modules"] == 2 * 7
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    diff = (_logits(merged) - _logits(peft_model)).abs().max().item()
    assert diff < 1e-4
    assert diff < (_logits(peft_model) - _logits(AutoModelForCausalLM.from_pretrained(base))).abs().max().item()


GEMMA3_IMAGE_TEXT = "gemma3-image-text"  # Gemma3ForConditionalGeneration: checkpoint keys differ from module names


@pytest.mark.parametrize("case", [*ctm.TINY_CASES, GEMMA3_IMAGE_TEXT])
def test_merge_is_exact_for_every_architecture(tmp_path, case):
    """Tiny random models of every architecture the GGUF converter takes (norms and biases random too), LoRA on
    all linear layers (Phi-3: the fused qkv_proj and gate_up_proj), in fp32."""
    base = tmp_path / "base"
    if case == GEMMA3_IMAGE_TEXT:
        ctm.build_tiny_gemma3_multimodal(base, None, dtype=torch.float32)
    else:
        ctm.build_tiny_model(case, base, None, dtype=torch.float32)
    peft_model = _adapter(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    lora_layers = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    if case.startswith("phi"):
        assert {name.rsplit(".", 1)[-1] for name in lora_layers} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    facts = merge_into(base, tmp_path / "adapter", tmp_path / "merged")
    assert facts["merged_modules"] == len(lora_layers)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokens = torch.randint(0, ctm.SMALL_VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        peft_logits = peft_model(tokens).logits
        merged_logits = merged(tokens).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(tokens).logits
    assert (merged_logits - peft_logits).abs().max().item() < 1e-4
    assert (peft_logits - base_logits).abs().max().item() > 0.1  # the adapter changes the model


@pytest.mark.slow
def test_merge_is_exact_on_smollm2_and_keeps_tokenizer_and_generation_config(smollm2_hf_dir, tmp_path):
    """The real SmolLM2-135M-Instruct (fp32, 30 layers, logits up to ~34) with a LoRA on three projections of
    every layer, its random B scaled by 0.1 so that it moves the logits by ~7 rather than ~30."""
    torch.manual_seed(2)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(smollm2_hf_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    facts = merge_into(smollm2_hf_dir, tmp_path / "adapter", tmp_path / "merged")
    assert facts["merged_modules"] == 3 * 30
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokens = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        peft32, merged32 = peft_model(tokens).logits, merged(tokens).logits
        with peft_model.disable_adapter():
            assert (peft_model(tokens).logits - peft32).abs().max().item() > 1.0  # the adapter matters
        peft64, merged64 = peft_model.double()(tokens).logits, merged.double()(tokens).logits
    # Computed in float64, the only difference left is the merged weights' rounding to fp32 (measured 1.7e-5).
    assert (merged64 - peft64).abs().max().item() < 1e-4
    # Computed in fp32, each model is itself up to ~1.3e-4 (PEFT) / ~0.9e-4 (merged) off its float64 logits at
    # this depth and logit size, so fp32 vs fp32 (measured 0.8e-4 here, 1.3e-4 on a 2 x 32 batch) is held to
    # that noise floor rather than to 1e-4.
    assert (merged32 - peft32).abs().max().item() < 5e-4

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "merged" / name).read_bytes() == (smollm2_hf_dir / name).read_bytes(), name
    chat = [{"role": "user", "content": "Hi"}]
    rendered = AutoTokenizer.from_pretrained(tmp_path / "merged").apply_chat_template(chat)
    assert rendered == AutoTokenizer.from_pretrained(smollm2_hf_dir).apply_chat_template(chat)
    assert GenerationConfig.from_pretrained(tmp_path / "merged") == GenerationConfig.from_pretrained(smollm2_hf_dir)


def test_nf4_base_is_dequantized_then_merged(tmp_path):
    base = _base(tmp_path / "base")
    q = qlora_quantization(torch.float32)
    AutoModelForCausalLM.from_pretrained(base, quantization_config=q, device_map="cpu").save_pretrained(tmp_path / "q4")
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "q4", device_map="cpu")
    peft_model = _adapter(quantized, tmp_path / "adapter")
    facts = merge_into(tmp_path / "q4", tmp_path / "adapter", tmp_path / "merged")
    assert facts["dequantized_nf4"]
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.float32
    # exact on the weights: dequantized NF4 + (alpha/r) B A, as PEFT would apply it
    layer = peft_model.base_model.model.model.layers[1].mlp.down_proj
    expected = dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).float()
    expected += layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(merged.model.layers[1].mlp.down_proj.weight, expected, atol=1e-6)
    # bitsandbytes' CPU 4-bit matmul rounds differently from a plain fp32 matmul: logits agree to ~1e-3
    assert (_logits(merged) - _logits(peft_model)).abs().max().item() < 5e-3


def test_adapter_for_another_model_is_refused(tmp_path):
    base = _base(tmp_path / "base")
    other = LlamaConfig(**{**TINY.to_dict(), "hidden_size": 32, "intermediate_size": 64})
    _adapter(LlamaForCausalLM(other), tmp_path / "adapter")
    with pytest.raises(MergeError, match=r"adapter for model\.layers\.0\..* is \(\d+, \d+\), base weight is"):
        merge_into(base, tmp_path / "adapter", tmp_path / "merged")
