"""The causal-LM loss of one (packed) batch, the same call whether or not the model is patched."""

from __future__ import annotations

import torch
from torch import nn

from forge.data.shards import IGNORE_INDEX, additive_mask


def _activation_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype attention scores have: autocast's when it is on, else the embeddings'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.get_input_embeddings().weight.dtype


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; a CPU tensor goes to a GPU through pinned memory without a host sync."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.contiguous().pin_memory().to(device, non_blocking=True)  # expanded views: one copy each
    return t.to(device)


def causal_lm_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    normalizer: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """sum over target tokens of -log p(token | its prefix), divided by `normalizer`.

    batch: ``input_ids`` [B, S], ``labels`` [B, S] (unshifted, -100 where nothing is learned), optional
    ``position_ids`` (restarting at 0 at each packed example) and ``attention_mask`` ([B, S] padding
    mask, or forge.data's boolean [B, 1, S, S] block-causal mask, made additive here), as
    `forge.data.shards.collate` builds it; moved to the model's device. The first token of every packed
    example is never a target (it would be predicted from the previous example).

    normalizer: None -> the mean over this batch's targets. For gradient accumulation pass the number of
    target tokens of the whole accumulated batch: the micro-batch losses (and gradients) then add up to
    the full batch's mean exactly. 1 gives the plain sum (for evaluation).

    Patched model (`forge.models.patching`): fused linear cross-entropy, no logits materialized.
    Unpatched: transformers' own loss (``num_items_in_batch``), so both paths give the same number.
    """
    device = model.get_input_embeddings().weight.device
    labels = batch["labels"]
    position_ids = batch.get("position_ids")
    if position_ids is not None:
        labels = labels.masked_fill(position_ids.to(labels.device) == 0, IGNORE_INDEX)
    labels = _to_device(labels, device)
    if position_ids is not None:
        position_ids = _to_device(position_ids, device)
    mask = batch.get("attention_mask")
    if mask is not None:
        mask = _to_device(mask, device)
        if mask.dtype == torch.bool and mask.dim() == 4:  # eager attention adds the mask: make it additive
            dtype = _activation_dtype(model, device)
            mask = additive_mask(mask, dtype)
    out = model(
        input_ids=_to_device(batch["input_ids"], device),
        attention_mask=mask,
        position_ids=position_ids,
        labels=labels,
        num_items_in_batch=normalizer,
        use_cache=False,
    )
    return out.loss
