"""AdamW (or bitsandbytes' 8-bit AdamW) and the learning-rate schedule: linear warm-up, then decay."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from forge.config import TrainConfig


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; weight decay applies to matrices only, not to norms or biases.

    On CUDA (fp32 parameters) the fused AdamW kernel runs (`ListedFusedAdamW`): one launch for all parameters
    instead of a few per tensor, the same update up to rounding."""
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
    if all(p.is_cuda and p.dtype == torch.float32 for p in params):
        return ListedFusedAdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


class ListedFusedAdamW(torch.optim.AdamW):
    """torch's fused AdamW, with its per-step walk over the parameters done once.

    torch's `step` visits every parameter in Python each step (state lookup, checks, grouping by device and
    dtype): for the ~450 small tensors of a LoRA model that is milliseconds of host time at the end of the
    step, while the GPU has nothing queued. Once the first step has made the state, this class keeps each
    group's parameter and state lists and calls the same fused kernel on them: the same update, bit for bit,
    and the same `state_dict`. It falls back to torch's step when a gradient is missing, a GradScaler
    passes its scale, or a group's tensors are not all on one device in one dtype."""

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, fused=True, **kwargs)
        self._listed: list[tuple[dict, list, list, list, list]] | None = None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._listed = None

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._listed = None

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step (closure: as torch's, and then torch's own step runs)."""
        scaled = getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None
        if closure is not None or scaled or self._listed is None:
            loss = super().step(closure)
            self._listed = self._list_groups()
            return loss
        grads = [[p.grad for p in params] for _, params, *_ in self._listed]
        if any(g is None for group in grads for g in group):
            return super().step()
        for (group, params, exp_avgs, exp_avg_sqs, steps), group_grads in zip(self._listed, grads, strict=True):
            beta1, beta2 = group["betas"]
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(
                params, group_grads, exp_avgs, exp_avg_sqs, [], steps,
                amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                eps=group["eps"], maximize=False, grad_scale=None, found_inf=None,
            )
        return None

    def _list_groups(self) -> list[tuple[dict, list, list, list, list]] | None:
        """Each group's parameters and their exp_avg, exp_avg_sq and step tensors, or None where the fast
        path would not do exactly what torch's step does."""
        listed = []
        for group in self.param_groups:
            params = group["params"]
            if group["amsgrad"] or group["maximize"] or isinstance(group["lr"], torch.Tensor):
                return None
            if any(p not in self.state for p in params) or len({(p.device, p.dtype) for p in params}) > 1:
                return None
            states = [self.state[p] for p in params]
            listed.append(
                (group, params, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                 [s["step"] for s in states])
            )
        return listed


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
