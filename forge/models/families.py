"""Per-family facts the kernel patching needs, as data: one row per transformers ``model_type``.

Every family listed here builds its decoder from four classes of one modeling module, named
``<prefix>RMSNorm``, ``<prefix>Attention``, ``<prefix>MLP`` and ``<prefix>ForCausalLM``; the attention
projects q/k/v, optionally normalizes q and k per head, applies rotate-half RoPE, calls transformers'
attention interface and projects the output with o_proj. The columns say where they differ.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Family:
    model_type: str  # config.model_type
    module: str  # the transformers modeling module
    prefix: str  # class-name prefix inside it
    gemma_norm: bool  # RMSNorm scales by (1 + weight), computed in fp32 (Gemma 1/2/3)
    qk_norm: bool  # q_norm / k_norm over each head before RoPE (Qwen3, Gemma3)
    sliding_window: str | None  # where the attention reads its window: "module" attribute, "config", or none
    attn_softcap: bool  # attention-logit soft-capping passed to the attention interface (Gemma2)
    final_softcap: bool  # config.final_logit_softcapping applies to the logits (Gemma2, Gemma3)
    post_mlp_norm: bool  # a norm reads the MLP's output before the residual add (Gemma2, Gemma3)

    def modeling(self) -> ModuleType:
        return importlib.import_module(self.module)

    def cls(self, suffix: str) -> type:
        """The family's class named prefix + suffix (suffix: RMSNorm, Attention, MLP, ForCausalLM)."""
        return getattr(self.modeling(), self.prefix + suffix)


_M = "transformers.models.{0}.modeling_{0}"

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", _M.format("llama"), "Llama", False, False, None, False, False, False),
        Family("mistral", _M.format("mistral"), "Mistral", False, False, "config", False, False, False),
        Family("qwen2", _M.format("qwen2"), "Qwen2", False, False, "module", False, False, False),
        Family("qwen3", _M.format("qwen3"), "Qwen3", False, True, "module", False, False, False),
        Family("gemma", _M.format("gemma"), "Gemma", True, False, None, False, False, False),
        Family("gemma2", _M.format("gemma2"), "Gemma2", True, False, "module", True, True, True),
        Family("gemma3_text", _M.format("gemma3"), "Gemma3", True, True, "module", False, True, True),
    )
}


def family_of(config) -> Family | None:
    """The family row for a transformers config, None when Forge has no patch for its model_type."""
    return FAMILIES.get(getattr(config, "model_type", None))
