"""Triton kernels with manual backward, each beside its PyTorch reference (import as ``forge.kernels``)."""

from ._device import HAS_TRITON, use_triton
from .cross_entropy import cross_entropy_reference, fused_linear_cross_entropy, shift_labels
from .lora import (
    LoRAProj,
    keep_compute_copies,
    lora_linear,
    lora_mlp,
    lora_mlp_reference,
    lora_proj_reference,
    lora_qkv,
    refresh_compute_copies,
)
from .nf4 import NF4Weight, as_dense, dequantize_nf4, dequantize_nf4_reference
from .rmsnorm import rms_norm, rms_norm_reference
from .rope import apply_rope, rope_reference
from .swiglu import geglu, glu, glu_reference, swiglu

__all__ = [
    "HAS_TRITON",
    "LoRAProj",
    "NF4Weight",
    "apply_rope",
    "as_dense",
    "cross_entropy_reference",
    "dequantize_nf4",
    "dequantize_nf4_reference",
    "fused_linear_cross_entropy",
    "geglu",
    "glu",
    "glu_reference",
    "keep_compute_copies",
    "lora_linear",
    "lora_mlp",
    "lora_mlp_reference",
    "lora_proj_reference",
    "lora_qkv",
    "refresh_compute_copies",
    "rms_norm",
    "rms_norm_reference",
    "rope_reference",
    "shift_labels",
    "swiglu",
    "use_triton",
]
