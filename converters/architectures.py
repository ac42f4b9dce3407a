"""Per-architecture conversion facts as data: GGUF architecture, tensor-name tables, weight fix-ups.

Each supported Hugging Face architecture class maps to one `ArchSpec`. The tensor tables map the HF module
path (inside `model.layers.{i}.` for the block tables) to a `gguf.MODEL_TENSOR`, whose GGUF name comes from
the `gguf` package's own table (`gguf.TENSOR_NAMES`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import gguf

from .errors import ConversionError

T = gguf.MODEL_TENSOR

GLOBAL_TENSORS: dict[str, gguf.MODEL_TENSOR] = {
    "model.embed_tokens": T.TOKEN_EMBD,
    "model.norm": T.OUTPUT_NORM,
    "lm_head": T.OUTPUT,
}

LLAMA_BLOCK: dict[str, gguf.MODEL_TENSOR] = {
    "input_layernorm": T.ATTN_NORM,
    "self_attn.q_proj": T.ATTN_Q,
    "self_attn.k_proj": T.ATTN_K,
    "self_attn.v_proj": T.ATTN_V,
    "self_attn.o_proj": T.ATTN_OUT,
    "post_attention_layernorm": T.FFN_NORM,
    "mlp.gate_proj": T.FFN_GATE,
    "mlp.up_proj": T.FFN_UP,
    "mlp.down_proj": T.FFN_DOWN,
}

QK_NORMS: dict[str, gguf.MODEL_TENSOR] = {
    "self_attn.q_norm": T.ATTN_Q_NORM,
    "self_attn.k_norm": T.ATTN_K_NORM,
}

# Gemma 2/3 wrap both sublayers in a pre- and a post-norm; HF's `post_attention_layernorm` is the
# attention's post-norm there, not the feed-forward's pre-norm as in Llama.
GEMMA2_BLOCK: dict[str, gguf.MODEL_TENSOR] = {
    **LLAMA_BLOCK,
    "post_attention_layernorm": T.ATTN_POST_NORM,
    "pre_feedforward_layernorm": T.FFN_PRE_NORM,
    "post_feedforward_layernorm": T.FFN_POST_NORM,
}

# Phi-3 keeps Q/K/V fused and gate/up fused; llama.cpp takes them fused as attn_qkv and ffn_up (2 x n_ff).
PHI3_BLOCK: dict[str, gguf.MODEL_TENSOR] = {
    "input_layernorm": T.ATTN_NORM,
    "self_attn.qkv_proj": T.ATTN_QKV,
    "self_attn.o_proj": T.ATTN_OUT,
    "post_attention_layernorm": T.FFN_NORM,
    "mlp.gate_up_proj": T.FFN_UP,
    "mlp.down_proj": T.FFN_DOWN,
}


@dataclass(frozen=True)
class ArchSpec:
    """How one HF architecture becomes a GGUF file that llama.cpp runs."""

    gguf_arch: gguf.MODEL_ARCH
    block_tensors: dict[str, gguf.MODEL_TENSOR]
    # llama.cpp's "normal" rope rotates adjacent pairs; HF's Llama rotates halves: permute Q/K rows.
    permute_qk: bool = False
    # Gemma's RMSNorm computes x * (1 + w); llama.cpp computes x * w: store w + 1.
    norm_offset: float = 0.0
    # False where llama.cpp always reuses token_embd as the output projection (Gemma 1 and 2).
    has_output_tensor: bool = True
    attn_softcap: bool = False
    final_softcap: bool = False
    # Write the sliding window and the per-layer sliding/full pattern (from config `layer_types`).
    sliding_window: bool = False
    # Checkpoint prefixes renamed to "model." (text tower of a multimodal checkpoint) and ones dropped.
    text_prefixes: tuple[str, ...] = ()
    skip_prefixes: tuple[str, ...] = ()

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


_GEMMA3 = ArchSpec(
    gguf.MODEL_ARCH.GEMMA3,
    {**GEMMA2_BLOCK, **QK_NORMS},
    norm_offset=1.0,
    final_softcap=True,
    sliding_window=True,
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, LLAMA_BLOCK, permute_qk=True),
    "MistralForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, LLAMA_BLOCK, permute_qk=True),
    "Qwen2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN2, LLAMA_BLOCK),
    "Qwen3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN3, {**LLAMA_BLOCK, **QK_NORMS}),
    "GemmaForCausalLM": ArchSpec(gguf.MODEL_ARCH.GEMMA, LLAMA_BLOCK, norm_offset=1.0, has_output_tensor=False),
    "Gemma2ForCausalLM": ArchSpec(
        gguf.MODEL_ARCH.GEMMA2,
        GEMMA2_BLOCK,
        norm_offset=1.0,
        has_output_tensor=False,
        attn_softcap=True,
        final_softcap=True,
        sliding_window=True,
    ),
    "Gemma3ForCausalLM": _GEMMA3,
    "Gemma3ForConditionalGeneration": replace(
        _GEMMA3,
        text_prefixes=("model.language_model.", "language_model.model."),
        skip_prefixes=(
            "model.vision_tower.",
            "model.multi_modal_projector.",
            "vision_tower.",
            "multi_modal_projector.",
            "language_model.lm_head.",
        ),
    ),
    "Phi3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.PHI3, PHI3_BLOCK),
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(ARCHITECTURES)


def arch_spec(hf_architecture: str, config_path: str) -> ArchSpec:
    """The spec for an HF architecture class name, or a ConversionError listing the supported ones."""
    spec = ARCHITECTURES.get(hf_architecture)
    if spec is None:
        raise ConversionError(
            f"{config_path}: architecture {hf_architecture!r} is not supported by the GGUF converter; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return spec
