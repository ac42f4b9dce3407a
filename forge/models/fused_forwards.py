"""The forwards `patching.py` binds onto transformers modules: same inputs and outputs, fused kernels inside.

Each one is a method (its `self` is the module it replaces the forward of) and decides on every call:
a projection the kernels cannot run exactly (`fused_projection` says why) runs its own module forward, and
anything outside what the fused path covers (a KV cache, an unknown attention implementation, no labels)
calls the class's own forward. The facts of the model family are read from ``self._forge_family``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from forge.kernels import (
    LoRAProj,
    apply_rope,
    fused_linear_cross_entropy,
    glu,
    lora_linear,
    lora_mlp,
    lora_qkv,
    rms_norm,
    shift_labels,
)
from forge.models.projections import fused_projection

# transformers attention implementations the patched attention calls through the same interface as the
# original does (anything else, e.g. paged attention, keeps the original forward).
FUSED_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
IGNORE_INDEX = -100
# The KV cache's name: ``cache`` from transformers 5.2x on (``past_key_values`` still accepted, deprecated),
# ``past_key_values`` before; the patched forwards pass either through as the caller named it.
CACHE_KWARGS = ("cache", "past_key_values")
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
KEEP_GLU_OUTPUT = "_forge_keep_h"  # on a patched MLP: keep act(gate) * up from forward to backward
_RECOMPUTING: ContextVar[bool] = ContextVar("forge_recomputing", default=False)
_UP_OUTPUTS: ContextVar[UpOutputStore | None] = ContextVar("forge_up_outputs", default=None)
_MADE_POSITIONS: ContextVar[bool] = ContextVar("forge_made_positions", default=False)


class UpOutputStore(Protocol):
    """Where a decoder layer's MLP keeps its up projection's output from the forward for the recomputation."""

    def put(self, up: torch.Tensor) -> None:
        """Keep `up` (the first forward's; not to be written)."""

    def take(self) -> torch.Tensor:
        """The kept output, on the device, for the recomputation to use (and to write over)."""


@contextmanager
def recomputation() -> Iterator[None]:
    """Mark the forwards run inside as activation recomputation, whose decoder-layer outputs are thrown away
    (only the graph they build and the tensors it saves reach the backward): a patched MLP whose output goes
    straight into the residual add then skips computing it (the down projection, a quarter of the FLOPs)."""
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


@contextmanager
def up_outputs(store: UpOutputStore | None) -> Iterator[None]:
    """Within this block a patched MLP's forward gives its up projection's output to `store.put`, and its
    recomputation (inside `recomputation()`) takes it back from `store.take` instead of computing it again.
    None: neither (the MLP computes its up projection every time)."""
    token = _UP_OUTPUTS.set(store)
    try:
        yield
    finally:
        _UP_OUTPUTS.reset(token)


def skip_packed_sequence_check() -> None:
    """Make transformers' packed-sequence check (``masking_utils.find_packed_sequence_indices``, one host
    sync a forward) answer without the device when the patched loss forward knows the answer: a batch with
    neither position ids nor an attention mask, where the base model numbers the positions 0..n-1 itself
    (one sequence a row: not packed, the check's None). Every other call runs the check. Idempotent."""
    import transformers.masking_utils as masking

    check = getattr(masking, "find_packed_sequence_indices", None)
    if check is None or getattr(check, "_forge_original", None) is not None:
        return

    def find_packed_sequence_indices(position_ids: torch.Tensor) -> torch.Tensor | None:
        return None if _MADE_POSITIONS.get() else find_packed_sequence_indices._forge_original(position_ids)

    find_packed_sequence_indices._forge_original = check
    masking.find_packed_sequence_indices = find_packed_sequence_indices


def keep_glu_output(module: torch.nn.Module) -> None:
    """Let the patched MLPs inside `module` keep their GLU output for the backward instead of recomputing
    it (`lora_mlp`'s keep_h)."""
    for m in module.modules():
        if getattr(m, "_forge_activation", None) is not None:
            setattr(m, KEEP_GLU_OUTPUT, True)


def attention_implementation(config) -> str:
    return getattr(config, "_attn_implementation", None) or "eager"


def lm_head_reason(head: torch.nn.Module) -> str | None:
    """Why the fused cross-entropy cannot use this output layer, None when it can."""
    if type(head) is not torch.nn.Linear:
        kind = f"{type(head).__module__}.{type(head).__name__}"
        return f"lm_head is {kind}, not a plain nn.Linear (an adapter or modules_to_save on it)"
    if head.bias is not None:
        return "lm_head has a bias"
    return None


def rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """<Family>RMSNorm.forward: the RMSNorm kernel (Gemma's (1 + w) form for the Gemma families)."""
    eps = self.eps if hasattr(self, "eps") else self.variance_epsilon
    return rms_norm(hidden_states, self.weight, eps, unit_offset=self._forge_family.gemma_norm)


def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """<Family>MLP.forward: down(act(gate(x)) * up(x)) as one fused LoRA MLP, else the GLU kernel alone."""
    act = self._forge_activation
    projs = [fused_projection(m) for m in (self.gate_proj, self.up_proj, self.down_proj)]
    if all(isinstance(p, LoRAProj) for p in projs):
        recomputing, store = _RECOMPUTING.get(), _UP_OUTPUTS.get()
        output = not recomputing or self._forge_family.post_mlp_norm  # a norm's backward reads it
        given = store.take() if store is not None and recomputing else None
        sink = store.put if store is not None and not recomputing else None
        keep_h = getattr(self, KEEP_GLU_OUTPUT, False)
        return lora_mlp(
            x, *projs, activation=act, keep_h=keep_h, compute_output=output, up_output=given, on_up_output=sink
        )
    return self.down_proj(glu(self.gate_proj(x), self.up_proj(x), act))


def attention_forward(
    self,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """<Family>Attention.forward: fused LoRA QKV, RoPE kernel, transformers' attention, fused LoRA O.
    With a KV cache (generation), the original forward."""
    family = self._forge_family
    impl = attention_implementation(self.config)
    if any(kwargs.get(name) is not None for name in CACHE_KWARGS) or impl not in FUSED_ATTENTION:
        return type(self).forward(
            self,
            hidden_states=hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            **kwargs,
        )
    for name in CACHE_KWARGS:
        kwargs.pop(name, None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)

    projs = [fused_projection(m) for m in (self.q_proj, self.k_proj, self.v_proj)]
    if all(isinstance(p, LoRAProj) for p in projs):
        q, k, v = lora_qkv(hidden_states, *projs)
    else:
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape)
    if family.qk_norm:  # per head, before RoPE (norms are row-wise, so before or after the transpose is one)
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rope(q, k, cos, sin, inplace=True)

    extra = {}
    if family.sliding_window == "module":
        extra["sliding_window"] = self.sliding_window
    elif family.sliding_window == "config":
        extra["sliding_window"] = getattr(self.config, "sliding_window", None)
    if family.attn_softcap:
        extra["softcap"] = self.attn_logit_softcapping
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(impl, family.modeling().eager_attention_forward)
    out, weights = interface(
        self,
        q,
        k,
        v,
        attention_mask,
        dropout=self.attention_dropout if self.training else 0.0,
        scaling=self.scaling,
        **extra,
        **kwargs,
    )
    out = out.reshape(*input_shape, -1).contiguous()
    o = fused_projection(self.o_proj)
    out = lora_linear(out, o) if isinstance(o, LoRAProj) else self.o_proj(out)
    return out, weights


def causal_lm_forward(
    self,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    use_cache: bool | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    **kwargs,
):
    """<Family>ForCausalLM.forward: with labels, the loss comes from the fused linear cross-entropy and
    ``logits`` is None (the full logits never exist); without labels, the original forward.

    Loss: sum over targets of -log p / ``num_items_in_batch`` (default: the number of targets), targets
    ``shift_labels`` if given else labels shifted by one; Gemma2/3's final-logit soft-capping included.
    """
    head_reason = lm_head_reason(self.lm_head)
    keeps_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
    if labels is None or head_reason is not None or not keeps_all:
        return type(self).forward(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    made = position_ids is None and attention_mask is None and all(kwargs.get(n) is None for n in CACHE_KWARGS)
    token = _MADE_POSITIONS.set(made)
    try:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
    finally:
        _MADE_POSITIONS.reset(token)
    hidden = outputs.last_hidden_state
    ignore_index = kwargs.get("ignore_index", IGNORE_INDEX)
    targets = kwargs.get("shift_labels")
    if targets is None:
        targets = shift_labels(labels, ignore_index)
    softcap = self.config.final_logit_softcapping if self._forge_family.final_softcap else None
    loss = fused_linear_cross_entropy(
        hidden,
        self.lm_head.weight,
        targets.to(hidden.device),
        normalizer=kwargs.get("num_items_in_batch"),
        ignore_index=ignore_index,
        softcap=softcap,
    )
    result = CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
    )
    return result if return_dict else result.to_tuple()
