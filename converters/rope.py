"""RoPE scaling: which GGUF keys a rope type needs, and the per-frequency factor tensors some types need."""

from __future__ import annotations

import math
from typing import Any

import torch

from .errors import ConversionError

# rope types llama.cpp reads from keys (rope.scaling.*), from factor tensors, or that need nothing
KEY_SCALED = ("linear", "yarn")
TENSOR_SCALED = ("llama3", "longrope")
UNSCALED = ("default", None)


def check_rope_type(rope: dict[str, Any], where: str) -> str | None:
    """The rope type, or a ConversionError for one llama.cpp cannot reproduce from a GGUF file."""
    rope_type = rope.get("rope_type")
    if rope_type == "su":  # Phi-3's early name for longrope
        return "longrope"
    if rope_type in UNSCALED or rope_type in KEY_SCALED or rope_type in TENSOR_SCALED:
        return rope_type
    raise ConversionError(
        f"{where}: rope type {rope_type!r} is not supported; supported: default, linear, yarn, llama3, longrope"
    )


def longrope_attn_factor(rope: dict[str, Any], context_length: int, original_context: int) -> float:
    """Phi-3's attention scale for longrope: the configured one, else sqrt(1 + ln(scale) / ln(original))."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    scale = context_length / original_context
    return math.sqrt(1 + math.log(scale) / math.log(original_context)) if scale > 1.0 else 1.0


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Llama 3.1's per-frequency divisors (head_dim/2 of them), llama.cpp's `rope_freqs.weight`.

    Wavelengths shorter than original_ctx/high_freq_factor keep their frequency, longer than
    original_ctx/low_freq_factor are divided by `factor`, and the band between is interpolated smoothly.
    """
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    original_ctx = float(rope.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    factors = []
    for freq in inv_freq.tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < original_ctx / high:
            factors.append(1.0)
        elif wavelength > original_ctx / low:
            factors.append(factor)
        else:
            smooth = (original_ctx / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)
