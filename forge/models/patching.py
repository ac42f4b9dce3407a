"""Make a transformers causal LM (plain, PEFT LoRA, or QLoRA on a bitsandbytes 4-bit base) use Forge's kernels.

`patch_for_training(model)` replaces, on this model's module instances only (never on the classes, so
other models in the process are untouched), the forwards of:

- every ``<Family>RMSNorm``          -> the RMSNorm kernel (Gemma's ``1 + w`` form for the Gemma families)
- every ``<Family>Attention``        -> fused LoRA q/k/v, the RoPE kernel, transformers' own attention
                                        (eager / sdpa / flash / flex, with the family's window and
                                        soft-capping), fused LoRA o_proj
- every ``<Family>MLP``              -> the fused LoRA MLP (SwiGLU or GeGLU)
- the ``<Family>ForCausalLM``        -> with labels: fused linear + cross-entropy, no full logits

The replacements check, on every call, that the fused path computes exactly what the original does; where
it cannot (dropout > 0, DoRA, lora_bias, several or disabled or merged adapters, a trainable base weight,
a base layer other than nn.Linear / Linear4bit, an unknown attention implementation, a KV cache), that
part runs the original code. The returned `PatchReport` says what was patched and what stays on the
reference path and why; `patch_for_training` logs its lines.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn
from transformers.activations import ACT2FN

from forge.kernels.swiglu import HF_ACT_NAMES
from forge.models import fused_forwards as ff
from forge.models.families import FAMILIES, Family, family_of
from forge.models.projections import fused_projection

logger = logging.getLogger(__name__)

# What each patched part is called in PatchReport.patched.
PARTS = {
    "rms_norm": "RMSNorm kernel",
    "rope": "attention with the RoPE kernel",
    "lora_qkv": "fused LoRA QKV",
    "lora_o": "fused LoRA O",
    "lora_mlp": "fused LoRA MLP",
    "glu": "MLP with the GLU kernel only",
    "cross_entropy": "fused linear cross-entropy",
}


@dataclass
class PatchReport:
    """What `patch_for_training` did: module names per patched part (keys of PARTS), and module names per
    reason for every part left on the reference path."""

    family: str | None
    patched: dict[str, list[str]] = field(default_factory=lambda: {part: [] for part in PARTS})
    reference: dict[str, list[str]] = field(default_factory=dict)

    def keep_reference(self, name: str, reason: str) -> None:
        self.reference.setdefault(reason, []).append(name)

    def lines(self) -> list[str]:
        """Log lines: one summary, then one per reason something stays on the reference path."""
        done = [f"{len(names)} {PARTS[part]}" for part, names in self.patched.items() if names]
        head = f"kernels: {self.family or 'unsupported model'}: " + (", ".join(done) or "nothing patched")
        out = [head]
        for reason, names in self.reference.items():
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            out.append(f"kernels: reference path for {names[0]}{more}: {reason}")
        return out


def _activation(config, mlp: nn.Module) -> str | None:
    """The transformers activation name the MLP uses, when the GLU kernel has it."""
    for attr in ("hidden_activation", "hidden_act"):
        name = getattr(config, attr, None)
        if name in HF_ACT_NAMES and type(ACT2FN[name]) is type(getattr(mlp, "act_fn", None)):
            return name
    return None


def _bind(module: nn.Module, forward: Callable, family: Family) -> None:
    module._forge_family = family
    module.forward = types.MethodType(forward, module)  # a bound method: deepcopy rebinds it to the copy


def _projections(report: PatchReport, name: str, module: nn.Module, children: tuple[str, ...]) -> bool:
    """Record why any child projection cannot be fused; True when all can."""
    ok = True
    for child in children:
        how = fused_projection(getattr(module, child))
        if isinstance(how, str):
            report.keep_reference(f"{name}.{child}", how)
            ok = False
    return ok


def _patch_module(report: PatchReport, config, family: Family, kinds: dict[type, str], name: str, module) -> None:
    kind = kinds[type(module)]
    if kind == "rms_norm":
        _bind(module, ff.rms_norm_forward, family)
        report.patched["rms_norm"].append(name)
    elif kind == "attention":
        impl = ff.attention_implementation(config)
        if impl not in ff.FUSED_ATTENTION:
            report.keep_reference(name, f"attention implementation {impl!r} (fused: {', '.join(ff.FUSED_ATTENTION)})")
            return
        _bind(module, ff.attention_forward, family)
        report.patched["rope"].append(name)
        if _projections(report, name, module, ("q_proj", "k_proj", "v_proj")):
            report.patched["lora_qkv"].append(name)
        if _projections(report, name, module, ("o_proj",)):
            report.patched["lora_o"].append(name)
    elif kind == "mlp":
        act = _activation(config, module)
        if act is None:
            report.keep_reference(name, f"activation {type(getattr(module, 'act_fn', None)).__name__} has no kernel")
            return
        module._forge_activation = act
        _bind(module, ff.mlp_forward, family)
        fused = _projections(report, name, module, ("gate_proj", "up_proj", "down_proj"))
        report.patched["lora_mlp" if fused else "glu"].append(name)
    else:
        reason = ff.lm_head_reason(module.lm_head)
        if reason is not None:
            report.keep_reference(name or "lm_head", f"loss: {reason}")
            return
        _bind(module, ff.causal_lm_forward, family)
        ff.skip_packed_sequence_check()
        report.patched["cross_entropy"].append(name or type(module).__name__)


def patch_for_training(model: nn.Module, log: Callable[[str], None] | None = None) -> PatchReport:
    """Patch `model` (a transformers Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2 or Gemma3-text causal LM,
    optionally wrapped by PEFT LoRA, optionally with a bitsandbytes 4-bit base) in place to run Forge's
    fused kernels; returns what was patched and what was not, and logs it through `log` (default: logging).

    Call it after `get_peft_model`. Calling it again patches nothing new. The loss: pass labels (and
    ``num_items_in_batch``) to the model, or use `forge.models.loss.causal_lm_loss`.
    """
    log = log or logger.info
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = family_of(hf.config)
    report = PatchReport(family=family.model_type if family else None)
    if family is None:
        model_type = getattr(hf.config, "model_type", None)
        report.keep_reference(type(hf).__name__, f"model_type {model_type!r} has no patch ({', '.join(FAMILIES)})")
    else:
        kinds = {
            family.cls("RMSNorm"): "rms_norm",
            family.cls("Attention"): "attention",
            family.cls("MLP"): "mlp",
            family.cls("ForCausalLM"): "causal_lm",
        }
        for name, module in hf.named_modules():
            if type(module) not in kinds:
                continue
            if "forward" in module.__dict__:
                if getattr(module, "_forge_family", None) is None:
                    report.keep_reference(name, "forward already replaced by someone else (e.g. an accelerate hook)")
                continue
            _patch_module(report, hf.config, family, kinds, name, module)
    for line in report.lines():
        log(line)
    return report
