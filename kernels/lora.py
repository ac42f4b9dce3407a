"""Fused LoRA for the MLP, for QKV and for any single projection (O), with manual backward.

A LoRA projection (PEFT's ``lora.Linear`` with dropout 0):

    y = x W^T (+ bias) + s (x A^T) B^T         W [out, in] frozen (dense or NF4), A [r, in], B [out, r]

computed as xa = x A^T, t = xa (s B)^T (+ bias), then y = t + x W^T by one big GEMM that reads t as its C
(``addmm_`` in place), so the [T, out] output is written once rather than rewritten by a second pass.

Backward, with xa saved from the forward ([T, r], tiny) and dyb = dy (s B):

    dx = dy W + dyb A        dA = dyb^T x        dB = s dy^T xa

dx is again one big GEMM whose C is the small product dyb A; the products of further projections of the
same input accumulate into it with ``addmm_``.

Projections sharing an input (q, k, v; gate, up) that all have adapters with A's of one dtype share the
small products: A_cat = [A_1; A_2; ...] (ranks may differ) gives every xa from one x A_cat^T; in backward
the dyb's fill the columns of one [T, r_total] buffer, dA_cat = dyb^T x is one product split by rank, and
dyb A_cat is one product, the C of the first dx GEMM. Otherwise each projection runs alone.

The frozen weights never enter an autograd graph: the Functions take them as plain arguments, use them
(dequantizing NF4 on the fly, forward and backward) and return no gradient for them. A dense frozen
weight that requires grad is refused rather than silently left without a gradient.

MLP (gate, up, down; h = act(e) * g with e, g the gate and up outputs): the forward saves x, e, g and the
gate/up xa's; the backward computes dh = dy W_d + (dy s_d B_d) A_d, then one kernel (swiglu.py) gives
h (recomputed), de and dg; then the down adapter's grads from h, and dx from both branches. With keep_h
(memory to spare) the forward also saves h and h A_d^T, and the kernel writes only de and dg. A forward
run again only for its graph (activation recomputation, where the MLP's output feeds nothing the backward
reads) skips the GLU and the down projection: ``compute_output=False`` saves the same tensors and returns zeros.

QKV: one saved x and three projections; dx accumulates the three.

The heavy products are cuBLAS matmuls (``torch.mm``/``addmm_``) in the compute dtype (x's, or autocast's
when it is on); Triton does the NF4 dequantization and the activation. A and B may be fp32 masters: each
forward casts A (or A_cat) and s B to the compute dtype once (s folded into B's cast: one kernel; in training,
once and then rewritten after each optimizer step: `keep_compute_copies`) and saves those small copies for the
backward; the gradients are returned in each parameter's own dtype.
On CPU without Triton the same Functions run, with the PyTorch versions of those two kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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


def _scaled(t: torch.Tensor, s: float, dtype: torch.dtype) -> torch.Tensor:
    """s t in dtype in one kernel (none when t is in dtype already and s is 1); t itself is never written."""
    if s == 1.0:
        return t.to(dtype)
    return torch.mul(t, s, out=torch.empty_like(t, dtype=dtype))


class _Kept(NamedTuple):
    parts: tuple[torch.Tensor, ...]  # referenced, so their ids are not reused while the copy is kept
    scaling: float
    copy: torch.Tensor
    rows: list[torch.Tensor]  # the copy's row blocks, one a part (the copy itself for one part)


_kept: dict[tuple, _Kept] | None = None  # inside keep_compute_copies


@contextmanager
def keep_compute_copies() -> Iterator[None]:
    """Within this block, `compute_copy` makes each copy once and hands the same one out again.

    The training loop holds one open over its steps: the adapters' compute-dtype copies are then made in
    the first forward and afterwards only rewritten in place by `refresh_compute_copies` after each
    optimizer step (a few multi-tensor launches for all of them), instead of 13 small casts a decoder layer
    in every forward, which is host-bound between its big GEMMs. Nested blocks share the outer one's copies.
    """
    global _kept
    outer = _kept
    _kept = {} if outer is None else outer
    try:
        yield
    finally:
        _kept = outer


def refresh_compute_copies() -> None:
    """Rewrite every kept copy from its parts' values now: call after the parameters were updated in place
    (the optimizer step). Each copy gets exactly the values a new `compute_copy` would give."""
    if not _kept:
        return
    by_scaling: dict[float, tuple[list, list]] = {}
    for kept in _kept.values():
        dsts, srcs = by_scaling.setdefault(kept.scaling, ([], []))
        dsts += kept.rows
        srcs += kept.parts
    with torch.no_grad():
        for s, (dsts, srcs) in by_scaling.items():
            # s t in the parts' dtype, then cast: the rounding of torch.mul(t, s, out=<compute dtype>)
            torch._foreach_copy_(dsts, srcs if s == 1.0 else torch._foreach_mul(srcs, s))


def compute_copy(parts: Sequence[torch.Tensor], dtype: torch.dtype, s: float = 1.0) -> torch.Tensor:
    """s cat(parts) in dtype (parts itself when that is the one part as it is); never written by the kernels.

    Inside `keep_compute_copies` each copy is made once (not under inference mode: its tensors cannot be
    saved for a later backward)."""
    if len(parts) == 1 and s == 1.0 and parts[0].dtype == dtype:
        return parts[0]
    key = (dtype, s, *map(id, parts))
    if _kept is not None and key in _kept:
        return _kept[key].copy
    with torch.no_grad():  # used inside the Functions only, which give the parameters their gradients
        copy = _scaled(parts[0] if len(parts) == 1 else torch.cat(list(parts)), s, dtype)
    if _kept is not None and not torch.is_inference_mode_enabled():
        rows = list(copy.split([t.shape[0] for t in parts])) if len(parts) > 1 else [copy]
        _kept[key] = _Kept(tuple(parts), s, copy, rows)
    return copy


def _grad_dtypes(adapters: Sequence[tuple]) -> list[tuple[torch.dtype, torch.dtype] | None]:
    """Each adapter's (A dtype, B dtype), the dtypes its gradients are returned in; None without one."""
    return [None if A is None else (A.dtype, B.dtype) for A, B in adapters]


class _Saved(NamedTuple):
    """What the backward of projections sharing one input needs, in the compute dtype, one entry per
    projection (None without an adapter): xa = x A^T, A, s B; and A_cat when the A's were concatenated
    (the A's are then its row blocks and the xa's the column blocks of x A_cat^T)."""

    xa: list[torch.Tensor | None]
    a: list[torch.Tensor | None]
    bs: list[torch.Tensor | None]
    a_cat: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor | None]:
        return [*self.xa, *self.a, *self.bs, self.a_cat]

    @classmethod
    def load(cls, saved: Sequence[torch.Tensor | None], n: int) -> _Saved:
        """The inverse of `tensors` for n projections."""
        return cls(list(saved[:n]), list(saved[n : 2 * n]), list(saved[2 * n : 3 * n]), saved[3 * n])


def _concat(adapters: Sequence[tuple]) -> bool:
    """Whether projections sharing an input take the A_cat path: several, all with adapters, one A dtype."""
    return len(adapters) > 1 and all(A is not None for A, _ in adapters) and len({A.dtype for A, _ in adapters}) == 1


def _proj_out(x: torch.Tensor, p: LoRAProj, xa, bs, dtype: torch.dtype) -> torch.Tensor:
    """y = x W^T (+ bias) (+ xa bs^T) for x [T, in] in dtype: the small terms first, read by the big GEMM as its C."""
    w = as_dense(p.weight, dtype)
    bias = None if p.bias is None else p.bias.to(dtype)
    if xa is None:
        return x @ w.t() if bias is None else torch.addmm(bias, x, w.t())
    t = xa @ bs.t() if bias is None else torch.addmm(bias, xa, bs.t())
    return t.addmm_(x, w.t())  # in place: an out-of-place addmm would first copy t into a new y


def _shared_fwd(x: torch.Tensor, projs: Sequence[LoRAProj], adapters: Sequence[tuple], dtype: torch.dtype):
    """([y], _Saved) for the projections sharing x [T, in] (in dtype), adapters their (A, B) pairs."""
    sv = _adapter_fwd(x, projs, adapters, dtype)
    ys = [_proj_out(x, p, xai, bsi, dtype) for p, xai, bsi in zip(projs, sv.xa, sv.bs, strict=True)]
    return ys, sv


def _adapter_fwd(x: torch.Tensor | None, projs: Sequence[LoRAProj], adapters: Sequence[tuple], dtype: torch.dtype):
    """_Saved for the projections sharing x: the adapters' compute copies (A, s B) and x A^T (None without x)."""
    bs = [
        None if B is None else compute_copy((B,), dtype, p.scaling) for p, (_, B) in zip(projs, adapters, strict=True)
    ]
    if _concat(adapters):
        ranks = [A.shape[0] for A, _ in adapters]
        a_cat = compute_copy([A for A, _ in adapters], dtype)  # the masters concatenated, then cast once
        a = list(a_cat.split(ranks))
        xa = [None] * len(ranks) if x is None else list((x @ a_cat.t()).split(ranks, dim=1))
    else:
        a_cat = None
        a = [None if A is None else compute_copy((A,), dtype) for A, _ in adapters]
        xa = [None if ai is None or x is None else x @ ai.t() for ai in a]
    return _Saved(xa, a, bs, a_cat)


def _shared_bwd(
    dys: Sequence[torch.Tensor],
    x: torch.Tensor,
    projs: Sequence[LoRAProj],
    sv: _Saved,
    dtype: torch.dtype,
    need_dx: bool,
    need_a: Sequence[bool],
    need_b: Sequence[bool],
    grad_dtypes: Sequence[tuple[torch.dtype, torch.dtype] | None],
):
    """(dx, [dA], [dB]) of the projections sharing x, from their output grads dys [T, out_i] in dtype."""
    n = len(projs)
    dA: list[torch.Tensor | None] = [None] * n
    dB: list[torch.Tensor | None] = [None] * n
    for i, p in enumerate(projs):
        if sv.bs[i] is not None and need_b[i]:
            dB[i] = _scaled(dys[i].t() @ sv.xa[i], p.scaling, grad_dtypes[i][1])
    dyb: list[torch.Tensor | None] = [None] * n  # dy (s B) [T, r]
    dx = None
    if sv.a_cat is not None:
        if need_dx or any(need_a):
            ranks = [ai.shape[0] for ai in sv.a]
            dyb_cat = x.new_empty(x.shape[0], sum(ranks))
            for dy, bs, out in zip(dys, sv.bs, dyb_cat.split(ranks, dim=1), strict=True):
                torch.mm(dy, bs, out=out)
            if any(need_a):
                grads = (dyb_cat.t() @ x).to(grad_dtypes[0][0]).split(ranks)
                dA = [g if need else None for g, need in zip(grads, need_a, strict=True)]
            if need_dx:
                dx = dyb_cat @ sv.a_cat  # the C of the first dx GEMM below
    else:
        for i in range(n):
            if sv.bs[i] is not None and (need_dx or need_a[i]):
                dyb[i] = dys[i] @ sv.bs[i]
                if need_a[i]:
                    dA[i] = (dyb[i].t() @ x).to(grad_dtypes[i][0])
    if need_dx:
        for i, p in enumerate(projs):
            w = as_dense(p.weight, dtype)
            if dx is None:
                dx = dys[i] @ w if dyb[i] is None else torch.mm(dyb[i], sv.a[i]).addmm_(dys[i], w)
            else:
                dx.addmm_(dys[i], w)
                if dyb[i] is not None:
                    dx.addmm_(dyb[i], sv.a[i])
            del w
    return dx, dA, dB


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(dtype)


# ------------------------------------------------------------------------------------------ linear


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, p: LoRAProj, dtype: torch.dtype):
        with no_autocast(x.device):
            x2 = _flat(x, dtype)
            (y,), sv = _shared_fwd(x2, (p,), ((A, B),), dtype)
        ctx.save_for_backward(x2, *sv.tensors())
        ctx.p, ctx.dtype, ctx.x_meta, ctx.grad_dtypes = p, dtype, (x.shape, x.dtype), _grad_dtypes(((A, B),))
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, *saved = ctx.saved_tensors
        shape, xdtype = ctx.x_meta
        need = ctx.needs_input_grad
        with no_autocast(x2.device):
            dy2 = _flat(dy, ctx.dtype)
            dx, (dA,), (dB,) = _shared_bwd(
                (dy2,), x2, (ctx.p,), _Saved.load(saved, 1), ctx.dtype, need[0], need[1:2], need[2:3], ctx.grad_dtypes
            )
        if dx is not None:
            dx = dx.view(shape).to(xdtype)
        return dx, dA, dB, None, None


# --------------------------------------------------------------------------------------------- QKV


class LoRAQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qA, qB, kA, kB, vA, vB, projs, dtype):
        adapters = ((qA, qB), (kA, kB), (vA, vB))
        with no_autocast(x.device):
            x2 = _flat(x, dtype)
            ys, sv = _shared_fwd(x2, projs, adapters, dtype)
        ctx.save_for_backward(x2, *sv.tensors())
        ctx.projs, ctx.dtype, ctx.x_meta = projs, dtype, (x.shape, x.dtype)
        ctx.grad_dtypes = _grad_dtypes(adapters)
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in ys)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x2, *saved = ctx.saved_tensors
        shape, xdtype = ctx.x_meta
        need = ctx.needs_input_grad
        with no_autocast(x2.device):
            dys = [_flat(d, ctx.dtype) for d in (dq, dk, dv)]
            dx, dA, dB = _shared_bwd(
                dys, x2, ctx.projs, _Saved.load(saved, 3), ctx.dtype, need[0], need[1:7:2], need[2:7:2], ctx.grad_dtypes
            )
        if dx is not None:
            dx = dx.view(shape).to(xdtype)
        return (dx, *(g for pair in zip(dA, dB, strict=True) for g in pair), None, None)


# --------------------------------------------------------------------------------------------- MLP


class LoRAMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, gA, gB, uA, uB, dA, dB, projs, activation: str, dtype, keep_h: bool, compute_output: bool, given, sink
    ):
        gate, up, down = projs
        adapters = ((gA, gB), (uA, uB), (dA, dB))
        with no_autocast(x.device):
            x2 = _flat(x, dtype)
            if given is None:
                (e, g), sv = _shared_fwd(x2, (gate, up), adapters[:2], dtype)
            else:  # the up projection's output from an earlier run of this forward: only the gate's GEMM
                sv = _adapter_fwd(x2, (gate, up), adapters[:2], dtype)
                e, g = _proj_out(x2, gate, sv.xa[0], sv.bs[0], dtype), given.view(x2.shape[0], -1)
            if sink is not None:
                sink(g)
            h = glu_forward(e, g, activation) if compute_output or keep_h else None
            if compute_output:
                (y,), sd = _shared_fwd(h, (down,), adapters[2:], dtype)
            else:  # only what the backward reads: the down adapter's copies (and h A_d^T with keep_h)
                sd = _adapter_fwd(h, (down,), adapters[2:], dtype)
                y = x2.new_zeros(x2.shape[0], down.weight.shape[0])
        # keep_h: h and h A_d^T stay for the backward; else both are recomputed there from e and g
        kept = (h, sd.xa[0]) if keep_h else (None, None)
        del h
        ctx.save_for_backward(x2, e, g, *sv.tensors(), *sd.a, *sd.bs, *kept)
        ctx.projs, ctx.activation, ctx.dtype, ctx.x_meta = projs, activation, dtype, (x.shape, x.dtype)
        ctx.grad_dtypes = _grad_dtypes(adapters)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, e, g, *saved = ctx.saved_tensors
        a_d, bs_d, h, xa_d = saved[7:]
        gate, up, down = ctx.projs
        shape, xdtype = ctx.x_meta
        need = ctx.needs_input_grad
        dtype = ctx.dtype
        with no_autocast(x2.device):
            dy2 = _flat(dy, dtype)
            # dh = dy W_d + (dy s_d B_d) A_d, the LoRA term as the GEMM's C
            wd = as_dense(down.weight, dtype)
            dyb = None
            if a_d is None:
                dh = dy2 @ wd
            else:
                dyb = dy2 @ bs_d
                dh = torch.mm(dyb, a_d).addmm_(dy2, wd)
            del wd
            # h serves only the down adapter's gradients: recomputed when one needs it and it was not kept
            need_h = h is None and a_d is not None
            # de and dg over e and g (read by nothing after this); a second backward through this graph then
            # fails on the version check instead of reading them
            recomputed, de, dg = glu_backward(dh, e, g, ctx.activation, h_into_dh=True, need_h=need_h, into_inputs=True)
            for t in (e, g):
                torch.autograd.graph.increment_version(t)
            h = recomputed if h is None else h
            del dh, recomputed
            grad_dA = grad_dB = None
            if a_d is not None:
                a_dtype, b_dtype = ctx.grad_dtypes[2]
                if need[5]:
                    grad_dA = (dyb.t() @ h).to(a_dtype)
                if need[6]:
                    grad_dB = _scaled(dy2.t() @ (h @ a_d.t() if xa_d is None else xa_d), down.scaling, b_dtype)
            del h, dyb
            dx, (grad_gA, grad_uA), (grad_gB, grad_uB) = _shared_bwd(
                (de, dg),
                x2,
                (gate, up),
                _Saved.load(saved, 2),
                dtype,
                need[0],
                (need[1], need[3]),
                (need[2], need[4]),
                ctx.grad_dtypes[:2],
            )
        if dx is not None:
            dx = dx.view(shape).to(xdtype)
        return dx, grad_gA, grad_gB, grad_uA, grad_uB, grad_dA, grad_dB, None, None, None, None, None, None, None


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


def lora_mlp(
    x: torch.Tensor,
    gate: LoRAProj,
    up: LoRAProj,
    down: LoRAProj,
    activation: str = "silu",
    keep_h: bool = False,
    compute_output: bool = True,
    up_output: torch.Tensor | None = None,
    on_up_output: Callable[[torch.Tensor], None] | None = None,
):
    """down(act(gate(x)) * up(x)) with LoRA on any of the three: x [..., hidden] -> [..., hidden].

    activation: "silu" (SwiGLU), "gelu_tanh" or "gelu" (GeGLU), or a transformers ``hidden_act`` name.
    keep_h: keep h = act(gate) * up (and h A_d^T) from the forward for the backward, [..., intermediate]
    more memory a call, instead of recomputing them (the same values either way).
    compute_output: False returns zeros in place of the output and skips the down projection (and the GLU
    unless keep_h): for a recomputation whose output only carries the graph to the backward, which needs
    neither (the same gradients either way).
    up_output: the up projection's output [..., intermediate] of an earlier forward of this same input (kept
    aside, e.g. in host memory): the up GEMM is skipped and its values are used (exactly what it would give).
    on_up_output: called with the up projection's output [T, intermediate] once it is computed (to keep it
    aside for a later run; the callback must not write it).
    """
    _act_code(activation)
    for name, p in (("gate", gate), ("up", up), ("down", down)):
        _check(p, f"lora_mlp.{name}")
    return LoRAMLPFunction.apply(
        x,
        gate.A,
        gate.B,
        up.A,
        up.B,
        down.A,
        down.B,
        (gate, up, down),
        activation,
        compute_dtype(x),
        keep_h,
        compute_output,
        up_output,
        on_up_output,
    )
