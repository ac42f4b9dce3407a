"""The `{arch}.*` hyperparameter keys of a GGUF file, from the HF config and the architecture's spec."""

from __future__ import annotations

import gguf

from .errors import ConversionError
from .hf_config import ModelConfig
from .rope import check_rope_type, longrope_attn_factor


def rope_dimensions(cfg: ModelConfig) -> int:
    """How many dimensions of each head are rotated (Phi-3/4 rotate only a fraction of them)."""
    fraction = cfg.rope_full.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0
    return int(cfg.head_dim * float(fraction))


def write_hparams(writer: gguf.GGUFWriter, cfg: ModelConfig, n_vocab: int, file_type: gguf.LlamaFileType) -> None:
    """Add the architecture keys that llama.cpp reads for this model."""
    spec = cfg.spec
    writer.add_context_length(int(cfg.require("max_position_embeddings")))
    writer.add_embedding_length(int(cfg.require("hidden_size")))
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(int(cfg.require("intermediate_size")))
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(float(cfg.require("rms_norm_eps")))
    writer.add_vocab_size(n_vocab)
    writer.add_rope_dimension_count(rope_dimensions(cfg))
    writer.add_rope_freq_base(float(cfg.rope_full.get("rope_theta", 10000.0)))
    _write_rope_scaling(writer, cfg)
    if spec.attn_softcap and cfg.get("attn_logit_softcapping"):
        writer.add_attn_logit_softcapping(float(cfg.get("attn_logit_softcapping")))
    if spec.final_softcap and cfg.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(cfg.get("final_logit_softcapping")))
    if spec.sliding_window:
        _write_sliding_window(writer, cfg)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_rope_scaling(writer: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    rope = cfg.rope_full
    rope_type = check_rope_type(rope, str(cfg.path))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        original = rope.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
        if original is None:
            raise ConversionError(f"{cfg.path}: yarn rope scaling needs original_max_position_embeddings")
        writer.add_rope_scaling_orig_ctx_len(int(original))
    elif rope_type == "longrope":
        original = int(cfg.get("original_max_position_embeddings") or rope["original_max_position_embeddings"])
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_scaling_attn_factors(
            longrope_attn_factor(rope, int(cfg.require("max_position_embeddings")), original)
        )
    if cfg.rope_sliding and cfg.rope_sliding.get("rope_theta"):
        writer.add_rope_freq_base_swa(float(cfg.rope_sliding["rope_theta"]))


def _write_sliding_window(writer: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    if cfg.get("sliding_window"):
        writer.add_sliding_window(int(cfg.get("sliding_window")))
    layer_types = cfg.get("layer_types")
    if layer_types:
        if len(layer_types) != cfg.n_layers:
            raise ConversionError(f"{cfg.path}: layer_types has {len(layer_types)} entries for {cfg.n_layers} layers")
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
