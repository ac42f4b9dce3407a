"""AdamW (or bitsandbytes' 8-bit AdamW) and the learning-rate schedule: linear warm-up, then decay."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from forge.config import TrainConfig


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; weight decay applies to matrices only, not to norms or biases.

    On CUDA (fp32 parameters) the fused AdamW kernel runs: one launch for all parameters instead of a few per
    tensor, the same update up to rounding."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    params = [p for _, p in trainable]
    fused = all(p.is_cuda and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Warm-up climbs linearly to 1 over `warmup` steps without a wasted zero step; then `linear` and
    `cosine` decay towards 0 at `total_steps`, `constant` stays at 1.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> LambdaLR:
    """The per-step schedule of cfg.schedule with cfg.warmup_ratio of the steps as warm-up."""
    warmup = warmup_steps(total_steps, cfg.warmup_ratio)
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, cfg.schedule))
