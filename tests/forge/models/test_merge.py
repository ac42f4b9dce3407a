"""Merging a LoRA adapter gives the same model as PEFT applying it, for 16/32-bit and NF4 bases."""

import json

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from forge.models.merge import MergeError, merge_into

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


def test_nf4_base_is_dequantized_then_merged(tmp_path):
    base = _base(tmp_path / "base")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
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
