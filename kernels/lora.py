"""Fused LoRA for the MLP, for QKV and for any single projection (O), with manual backward.

A LoRA projection (PEFT's ``lora.Linear`` with dropout 0):

    y = x W^T (+ bias) + s (x A^T) B^T         W [out, in] frozen (dense or NF4), A [r, in], B [out, r]

Backward, with xa = x A^T saved from the forward ([T, r], tiny) and dyb = dy B:

    dx = dy W + s dyb A        dA = s dyb^T x        dB = s dy^T xa

The frozen weights never enter an autograd graph: the Functions take them as plain arguments, use them
(dequantizing NF4 on the fly, forward and backward) and return no gradient for them. A dense frozen
weight that requires grad is refused rather than silently left without a gradient.

MLP (gate, up, down; h = act(e) * g with e, g the gate and up outputs): the forward saves x, e, g and the
gate/up xa's; the backward computes dh = dy W_d + s_d (dy B_d) A_d, then one kernel (swiglu.py) gives
h (recomputed, never saved), de and dg; then the down adapter's grads from h, and dx from both branches
accumulated into one buffer with ``addmm_``.

QKV: one saved x and three projections; dx accumulates the three.

The heavy products are cuBLAS matmuls (``torch.mm``/``addmm_``) in the compute dtype (x's, or autocast's
when it is on); Triton does the NF4 dequantization and the activation. A and B may be fp32 masters:
they are cast to the compute dtype for the products and their gradients are returned in their dtype.
On CPU without Triton the same Functions run, with the PyTorch versions of those two kernels.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._device import compute_dtype, no_autocast
from .nf4 import NF4Weight, as_dense
from .swiglu import _act_code, glu_backward, glu_forward


class LoRAProj(NamedTuple):
    """One projection: frozen ``weight`` [out, in] (a tensor or an NF4Weight), optional frozen ``bias``
    [out], and an optional adapter ``A`` [r, in], ``B`` [out, r] with ``scaling`` (PEFT: alpha / r).
    A projection without an adapter (A and B None) is just the frozen linear."""

    weight: torch.Tensor | NF4Weight
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    scaling: float = 1.0
    bias: torch.Tensor | None = None


def _check(p: LoRAProj, name: str) -> None:
    w = p.weight
    if torch.is_tensor(w) and w.requires_grad:
        raise ValueError(f"{name}: the fused LoRA path needs a frozen base weight (requires_grad=False)")
    if p.bias is not None and p.bias.requires_grad:
        raise ValueError(f"{name}: the fused LoRA path needs a frozen bias (requires_grad=False)")
    if (p.A is None) != (p.B is None):
        raise ValueError(f"{name}: give both A and B, or neither")


# ------------------------------------------------------------------------------ shared forward/back


def _proj_fwd(x: torch.Tensor, p: LoRAProj, A, B, dtype: torch.dtype):
    """(y, xa) for x [T, in] in dtype; xa is None without an adapter."""
    w = as_dense(p.weight, dtype)
    y = x @ w.t()
    del w
    if p.bias is not None:
        y += p.bias.to(dtype)
    xa = None
    if A is not None:
        xa = x @ A.to(dtype).t()
        y.addmm_(xa, B.to(dtype).t(), alpha=p.scaling)
    return y, xa


def _proj_bwd(
    dy: torch.Tensor, x: torch.Tensor, xa, p: LoRAProj, A, B, dtype, dx, need_dx: bool, need_dA: bool, need_dB: bool
):
    """Adds this projection's share to dx (allocating it when None) and returns (dx, dA, dB)."""
    dA = dB = None
    dyb = None
    if A is not None:
        Bc = B.to(dtype)
        dyb = dy @ Bc  # [T, r]
        if need_dA:
            dA = (dyb.t() @ x).mul_(p.scaling).to(A.dtype)
        if need_dB:
            if xa is None:
                xa = x @ A.to(dtype).t()
            dB = (dy.t() @ xa).mul_(p.scaling).to(B.dtype)
    if need_dx:
        w = as_dense(p.weight, dtype)
        if dx is None:
            dx = dy @ w
        else:
            dx.addmm_(dy, w)
        del w
        if dyb is not None:
            dx.addmm_(dyb, A.to(dtype), alpha=p.scaling)
    return dx, dA, dB


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(dtype)


# ------------------------------------------------------------------------------------------ linear


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, p: LoRAProj, dtype: torch.dtype):
        with no_autocast(x.device):
            x2 = _flat(x, dtype)
            y, xa = _proj_fwd(x2, p, A, B, dtype)
        ctx.save_for_backward(x2, xa, A, B)
        ctx.p, ctx.dtype, ctx.x_meta = p, dtype, (x.shape, x.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, A, B = ctx.saved_tensors
        shape, xdtype = ctx.x_meta
        need = ctx.needs_input_grad
        with no_autocast(x2.device):
            dy2 = _flat(dy, ctx.dtype)
            dx, dA, dB = _proj_bwd(dy2, x2, xa, ctx.p, A, B, ctx.dtype, None, need[0], need[1], need[2])
        if dx is not None:
            dx = dx.view(shape).to(xdtype)
        return dx, dA, dB, None, None


# --------------------------------------------------------------------------------------------- QKV


class LoRAQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qA, qB, kA, kB, vA, vB, projs, dtype):
        with no_autocast(x.device):
            x2 = _flat(x, dtype)
            adapters = ((qA, qB), (kA, kB), (vA, vB))
            outs, xas = [], []
            for p, (A, B) in zip(projs, adapters, strict=True):
                y, xa = _proj_fwd(x2, p, A, B, dtype)
                outs.append(y.view(*x.shape[:-1], y.shape[-1]))
                xas.append(xa)
        ctx.save_for_backward(x2, *xas, qA, qB, kA, kB, vA, vB)
        ctx.projs, ctx.dtype, ctx.x_meta = projs, dtype, (x.shape, x.dtype)
        return tuple(outs)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x2, xa_q, xa_k, xa_v, qA, qB, kA, kB, vA, vB = ctx.saved_tensors
        shape, xdtype = ctx.x_meta
        need = ctx.needs_input_grad
        grads = []
        dx = None
        with no_autocast(x2.device):
            for i, (dy, xa, A, B) in enumerate(((dq, xa_q, qA, qB), (dk, xa_k, kA, kB), (dv, xa_v, vA, vB))):
                dx, dA, dB = _proj_bwd(
                    _flat(dy, ctx.dtype),
                    x2,
                    xa,
                    ctx.projs[i],
                    A,
                    B,
                    ctx.dtype,
                    dx,
                    need[0],
                    need[1 + 2 * i],
                    need[2 + 2 * i],
                )
                grads += [dA, dB]
        if dx is not None:
            dx = dx.view(shape).to(xdtype)
        return (dx, *grads, None, None)


# --------------------------------------------------------------------------------------------- MLP


class LoRAMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gA, gB, uA, uB, dA, dB, projs, activation: str, dtype):
        gate, up, down = projs
        with no_autocast(x.device):
            x2 = _flat(x, dtype)
            e, xa_g = _proj_fwd(x2, gate, gA, gB, dtype)
            g, xa_u = _proj_fwd(x2, up, uA, uB, dtype)
            h = glu_forward(e, g, activation)
            y, _ = _proj_fwd(h, down, dA, dB, dtype)  # h A_d^T is recomputed in backward with h
            del h
        ctx.save_for_backward(x2, e, g, xa_g, xa_u, gA, gB, uA, uB, dA, dB)
        ctx.projs, ctx.activation, ctx.dtype, ctx.x_meta = projs, activation, dtype, (x.shape, x.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, e, g, xa_g, xa_u, gA, gB, uA, uB, dA_, dB_ = ctx.saved_tensors
        gate, up, down = ctx.projs
        shape, xdtype = ctx.x_meta
        need = ctx.needs_input_grad
        dtype = ctx.dtype
        with no_autocast(x2.device):
            dy2 = _flat(dy, dtype)
            # dh = dy W_d + s_d (dy B_d) A_d
            wd = as_dense(down.weight, dtype)
            dh = dy2 @ wd
            del wd
            dyb = None
            if dA_ is not None:
                dyb = dy2 @ dB_.to(dtype)
                dh.addmm_(dyb, dA_.to(dtype), alpha=down.scaling)
            h, de, dg = glu_backward(dh, e, g, ctx.activation, h_into_dh=True)
            del dh
            grad_dA = grad_dB = None
            if dA_ is not None:
                if need[5]:
                    grad_dA = (dyb.t() @ h).mul_(down.scaling).to(dA_.dtype)
                if need[6]:
                    grad_dB = (dy2.t() @ (h @ dA_.to(dtype).t())).mul_(down.scaling).to(dB_.dtype)
            del h, dyb
            dx, grad_gA, grad_gB = _proj_bwd(de, x2, xa_g, gate, gA, gB, dtype, None, need[0], need[1], need[2])
            del de
            dx, grad_uA, grad_uB = _proj_bwd(dg, x2, xa_u, up, uA, uB, dtype, dx, need[0], need[3], need[4])
        if dx is not None:
            dx = dx.view(shape).to(xdtype)
        return dx, grad_gA, grad_gB, grad_uA, grad_uB, grad_dA, grad_dB, None, None, None


# -------------------------------------------------------------------------------------- reference


def lora_proj_reference(x: torch.Tensor, p: LoRAProj) -> torch.Tensor:
    """PEFT's lora.Linear forward (dropout 0) in plain autograd, in x's dtype."""
    w = p.weight.dequantize(x.dtype) if isinstance(p.weight, NF4Weight) else p.weight.to(x.dtype)
    y = torch.nn.functional.linear(x, w, None if p.bias is None else p.bias.to(x.dtype))
    if p.A is not None:
        y = y + (x @ p.A.to(x.dtype).t()) @ p.B.to(x.dtype).t() * p.scaling
    return y


def lora_mlp_reference(x, gate: LoRAProj, up: LoRAProj, down: LoRAProj, activation: str = "silu"):
    from .swiglu import glu_reference

    return lora_proj_reference(
        glu_reference(lora_proj_reference(x, gate), lora_proj_reference(x, up), activation), down
    )


# ----------------------------------------------------------------------------------------- public


def lora_linear(x: torch.Tensor, proj: LoRAProj) -> torch.Tensor:
    """One LoRA projection (the attention output o_proj, or any other): x [..., in] -> [..., out]."""
    _check(proj, "lora_linear")
    return LoRALinearFunction.apply(x, proj.A, proj.B, proj, compute_dtype(x))


def lora_qkv(x: torch.Tensor, q: LoRAProj, k: LoRAProj, v: LoRAProj):
    """q, k and v projections of one input: x [..., in] -> ([..., out_q], [..., out_k], [..., out_v])."""
    for name, p in (("q", q), ("k", k), ("v", v)):
        _check(p, f"lora_qkv.{name}")
    return LoRAQKVFunction.apply(x, q.A, q.B, k.A, k.B, v.A, v.B, (q, k, v), compute_dtype(x))


def lora_mlp(x: torch.Tensor, gate: LoRAProj, up: LoRAProj, down: LoRAProj, activation: str = "silu"):
    """down(act(gate(x)) * up(x)) with LoRA on any of the three: x [..., hidden] -> [..., hidden].

    activation: "silu" (SwiGLU), "gelu_tanh" or "gelu" (GeGLU), or a transformers ``hidden_act`` name.
    """
    _act_code(activation)
    for name, p in (("gate", gate), ("up", up), ("down", down)):
        _check(p, f"lora_mlp.{name}")
    return LoRAMLPFunction.apply(
        x, gate.A, gate.B, up.A, up.B, down.A, down.B, (gate, up, down), activation, compute_dtype(x)
    )
