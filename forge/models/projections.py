"""Read a linear layer (plain, bitsandbytes 4-bit, or wrapped by PEFT LoRA) as the kernels' `LoRAProj`.

`fused_projection(module)` returns the `LoRAProj` that computes exactly what the module's own forward
computes, or a string saying why the fused kernels cannot (the caller then runs the module itself).
It is called on every forward, so adapters disabled, merged or switched after patching are honoured.
"""

from __future__ import annotations

import torch
from torch import nn

from forge.kernels import LoRAProj, NF4Weight

FOUR_BIT_TYPES = ("nf4", "fp4")  # bitsandbytes 4-bit formats the NF4 kernel dequantizes (it reads the code)
DENSE_CACHE = "_forge_dense"  # on a Linear4bit: the dict in which its dequantized weight stays between calls


def four_bit_linears(module: nn.Module) -> list[nn.Module]:
    """The bitsandbytes 4-bit linear layers inside `module` (the layers that own a Params4bit, not PEFT's
    wrappers, whose ``weight`` is their base layer's)."""
    return [m for m in module.modules() if type(m._parameters.get("weight")).__name__ == "Params4bit"]


def dequantized_bytes(module: nn.Module, act_bytes: int) -> int:
    """Bytes the 4-bit linear layers inside `module` take dequantized to `act_bytes`-byte values."""
    return sum(act_bytes * m.weight.quant_state.shape.numel() for m in four_bit_linears(module))


def keep_dequantized(module: nn.Module) -> None:
    """Let every 4-bit linear layer inside `module` keep its dequantized weight from one fused forward or
    backward to the next: dequantized once a run instead of twice a step, for `dequantized_bytes` of memory."""
    for m in four_bit_linears(module):
        setattr(m, DENSE_CACHE, {})


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer")


def _frozen_base(base: nn.Module) -> tuple[torch.Tensor | NF4Weight, torch.Tensor | None] | str:
    """(weight, bias) of a frozen nn.Linear or bitsandbytes Linear4bit, or why it is not one."""
    weight = getattr(base, "weight", None)
    if type(weight).__name__ == "Params4bit":
        state = getattr(weight, "quant_state", None)
        if state is None:
            return "4-bit weight not quantized yet (no quant_state)"
        if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' CPU eval layout, not its packed one
            return "4-bit weight repacked for bitsandbytes' CPU kernel (see forge.train.model.keep_4bit_trainable)"
        if getattr(state, "quant_type", None) not in FOUR_BIT_TYPES:
            return f"4-bit type {getattr(state, 'quant_type', None)!r} is not nf4/fp4"
        dense = NF4Weight.from_linear4bit(base, getattr(base, DENSE_CACHE, None))
    elif type(base) is nn.Linear:
        if weight.requires_grad:
            return "trainable base weight"
        dense = weight
    else:
        return f"base layer {type(base).__name__} is neither nn.Linear nor bitsandbytes Linear4bit"
    bias = base.bias
    if bias is not None and bias.requires_grad:
        return "trainable base bias"
    return dense, bias


def _lora(module: nn.Module) -> LoRAProj | str:
    if module.disable_adapters:
        return "adapters disabled"
    if module.merged:
        return "adapter merged into the base weight"
    names = [name for name in module.active_adapters if name in module.lora_A]
    if len(names) > 1:
        return f"{len(names)} active adapters"
    base = _frozen_base(module.get_base_layer())
    if isinstance(base, str):
        return base
    weight, bias = base
    if not names:
        return LoRAProj(weight, bias=bias)
    name = names[0]
    dropout = module.lora_dropout[name]
    if not isinstance(dropout, nn.Identity) and getattr(dropout, "p", 1.0) > 0:
        return f"lora_dropout {getattr(dropout, 'p', '?')} > 0"
    if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name):
        return "DoRA or another LoRA variant"
    lora_a, lora_b = module.lora_A[name], module.lora_B[name]
    if getattr(module, "lora_bias", {}).get(name) or lora_b.bias is not None or lora_a.bias is not None:
        return "lora_bias"
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
        return f"adapter layers {type(lora_a).__name__}/{type(lora_b).__name__} are not nn.Linear"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    return LoRAProj(weight, lora_a.weight, lora_b.weight, float(module.scaling[name]), bias)


def fused_projection(module: nn.Module) -> LoRAProj | str:
    """The module as a `LoRAProj` for the fused kernels, or the reason it must run its own forward.

    Fused: nn.Linear or bitsandbytes Linear4bit (nf4/fp4) with a frozen weight and bias, plain or wrapped
    by PEFT LoRA with one active, unmerged adapter, dropout 0, no DoRA/variant and no lora_bias.
    """
    if _is_lora_layer(module):
        return _lora(module)
    base = _frozen_base(module)
    return base if isinstance(base, str) else LoRAProj(base[0], bias=base[1])
