"""Tiny random models of every patched family, a packed batch, and the comparisons the patching tests share.

Loaded by path (pytest runs with --import-mode=importlib, so test folders are not importable):
`test_patching.py` (CPU) and `test_patching_gpu.py` (CUDA, also runnable as a script).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from forge.data.shards import collate

# Per family: config class and what differs from the shared shape. Gemma2/3 get soft-capping values small
# enough to matter at these sizes; Gemma uses eager attention (Gemma2 has no sdpa) so both paths are covered.
FAMILIES = {
    "llama": (LlamaConfig, {"tie_word_embeddings": False}),
    "mistral": (MistralConfig, {"sliding_window": 8}),
    "qwen2": (Qwen2Config, {}),
    "qwen3": (Qwen3Config, {}),
    "gemma": (GemmaConfig, {"hidden_act": "gelu_pytorch_tanh", "attn_implementation": "eager"}),
    "gemma2": (
        Gemma2Config,
        {"sliding_window": 8, "final_logit_softcapping": 3.0, "attn_logit_softcapping": 5.0},
    ),
    "gemma3_text": (Gemma3TextConfig, {"sliding_window": 8, "final_logit_softcapping": 3.0}),
}


def tiny_config(family: str, hidden: int = 64, heads: int = 4, kv_heads: int = 2, vocab: int = 128, layers: int = 2):
    """A config of `family` with head_dim = hidden / heads and an MLP twice as wide as hidden."""
    cls, extra = FAMILIES[family]
    head_dim = hidden // heads
    shape = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=256,
        initializer_range=0.1,  # larger than the default 0.02 so attention and the loss are far from uniform
    )
    if family in ("gemma2", "gemma3_text"):
        shape["query_pre_attn_scalar"] = head_dim  # their attention scale is query_pre_attn_scalar ** -0.5
    return cls(**{**shape, **extra})


def random_model(config, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised causal LM whose norm weights and biases are random too (HF starts them at
    1/0, which would hide a wrong (1 + w) or a dropped bias)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def add_lora(model: torch.nn.Module, seed: int = 1, **options) -> torch.nn.Module:
    """PEFT LoRA on every linear layer, with a random (non-zero) B so every adapter gradient is non-zero."""
    torch.manual_seed(seed)
    config = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **options}
    return get_peft_model(model, LoraConfig(**config))


def packed_batch(vocab: int, seq: int, seed: int = 3) -> dict[str, torch.Tensor]:
    """Two rows of `seq` tokens as forge.data's collate builds them: row 0 packs two examples (position ids
    restart, block-causal 4-D mask), row 1 holds one example and right padding. The first quarter of each
    example is prompt (label -100)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [[seq // 2 - 1, seq - seq // 2 + 1], [3 * seq // 4]]
    sequences = []
    for lengths in rows:
        ids, labels, positions = [], [], []
        for n in lengths:
            x = torch.randint(0, vocab, (n,), generator=gen)
            y = x.clone()
            y[: n // 4] = -100
            ids.append(x)
            labels.append(y)
            positions.append(torch.arange(n))
        sequences.append(
            {"input_ids": torch.cat(ids), "labels": torch.cat(labels), "position_ids": torch.cat(positions)}
        )
    return collate(sequences, pad_id=0)


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter's gradient (cloned), by name; the gradients are then cleared."""
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a - ref| / max|ref| (ref is never all zero here: B is random)."""
    return ((a - ref).abs().max() / ref.abs().max()).item()


def cosine(a: torch.Tensor, ref: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), ref.flatten(), dim=0).item()


def graph_functions(loss: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind `loss` (e.g. 'LoRAMLPFunctionBackward')."""
    seen, todo, names = set(), [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return names


FUSED_FUNCTIONS = {
    "RMSNormFunctionBackward",
    "RoPEFunctionBackward",
    "LoRAQKVFunctionBackward",
    "LoRALinearFunctionBackward",
    "LoRAMLPFunctionBackward",
    "FusedLinearCrossEntropyFunctionBackward",
}
