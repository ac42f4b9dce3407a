"""Rotary position embedding for q and k together (in place where autograd allows), forward and backward.

transformers' ``apply_rotary_pos_emb`` (rotate-half layout, as Llama, Mistral, Qwen2/3 and Gemma use):

    q_out = q * cos + rotate_half(q) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

With x1 = x[..., :D/2], x2 = x[..., D/2:] and cos/sin split the same way into (c1, c2), (s1, s2):

    forward:  y1 = x1 c1 - x2 s1        y2 = x2 c2 + x1 s2
    backward: dx1 = dy1 c1 + dy2 s2     dx2 = dy2 c2 - dy1 s1

Both halves of cos and sin are read, so any table transformers builds (default, linear, dynamic, YaRN,
llama3: all of them ``cat(freqs, freqs)``) gives exactly its result. One program handles one token
(b, s): it loads that token's cos/sin row once and rotates every head of q and then of k. q and k are
addressed through their strides, so HF's transposed views ``[B, H, S, D]`` are rotated where they lie.
"""

from __future__ import annotations

import torch

from ._device import next_pow2, tl, triton, use_triton

# ----------------------------------------------------------------------------------------- Triton


@triton.jit
def _rotate_heads(
    X,
    Y,
    b,
    s,
    n_heads,
    sxb,
    sxh,
    sxs,
    syb,
    syh,
    sys,
    c1,
    c2,
    s1,
    s2,
    d,
    dmask,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < n_heads)[:, None] & dmask[None, :]
        xp = X + b * sxb + s * sxs + h[:, None].to(tl.int64) * sxh + d[None, :]
        yp = Y + b * syb + s * sys + h[:, None].to(tl.int64) * syh + d[None, :]
        x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(yp, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(yp + HALF, y2.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q,
    QO,
    K,
    KO,
    COS,
    SIN,
    seq_len,
    n_q,
    n_k,
    sqb,
    sqh,
    sqs,
    sqob,
    sqoh,
    sqos,
    skb,
    skh,
    sks,
    skob,
    skoh,
    skos,
    scb,
    scs,
    HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    s = pid % seq_len
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    cp = COS + b * scb + s * scs + d
    sp = SIN + b * scb + s * scs + d
    c1 = tl.load(cp, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cp + HALF, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sp, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sp + HALF, mask=dmask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(Q, QO, b, s, n_q, sqb, sqh, sqs, sqob, sqoh, sqos, c1, c2, s1, s2, d, dmask, HALF, BLOCK_H, BACKWARD)
    _rotate_heads(K, KO, b, s, n_k, skb, skh, sks, skob, skoh, skos, c1, c2, s1, s2, d, dmask, HALF, BLOCK_H, BACKWARD)


def _cos_sin_3d(cos: torch.Tensor, sin: torch.Tensor):
    """cos/sin as [Bc, S, D] with Bc 1 or B: accepts [S, D], [Bc, S, D] or HF's unsqueezed [Bc, 1, S, D]."""
    if cos.dim() == 4:
        cos, sin = cos.squeeze(1), sin.squeeze(1)
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def _launch(q, qo, k, ko, cos, sin, backward: bool):
    bsz, n_q, seq, dim = q.shape
    n_k = k.shape[1]
    half = dim // 2
    block_d = next_pow2(half)
    block_h = max(1, min(next_pow2(max(n_q, n_k)), max(1, 4096 // block_d)))
    scb = cos.stride(0) if cos.shape[0] > 1 else 0
    grid = (bsz * seq,)
    if bsz * seq == 0:
        return
    _rope_kernel[grid](
        q,
        qo,
        k,
        ko,
        cos,
        sin,
        seq,
        n_q,
        n_k,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        qo.stride(0),
        qo.stride(1),
        qo.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        ko.stride(0),
        ko.stride(1),
        ko.stride(2),
        scb,
        cos.stride(1),
        HALF=half,
        BLOCK_D=block_d,
        BLOCK_H=block_h,
        BACKWARD=backward,
        num_warps=4 if half <= 64 else 8,
    )


def _like(x: torch.Tensor, strides: tuple[int, ...] | None = None) -> torch.Tensor:
    """A fresh tensor of x's shape and dtype laid out with `strides` (default: x's own layout where it is
    dense, e.g. HF's [B, S, H, D] memory seen as [B, H, S, D]; else contiguous)."""
    if strides is None:
        return torch.empty_like(x)  # preserve_format
    return torch.empty_strided(x.shape, strides, dtype=x.dtype, device=x.device)


class RoPEFunction(torch.autograd.Function):
    """Rotates q and k in one launch, into fresh tensors or, with ``inplace``, over q and k themselves
    (then marked dirty: autograd allows that for tensors that are not views). Outputs and gradients keep
    the inputs' memory layout, so HF's transposed views stay transposes of contiguous tensors on both ways
    (attention reads them as they lie, and the projections' gradients need no copy)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inplace: bool):
        if inplace:
            qo, ko = q, k
            ctx.mark_dirty(q, k)
        else:
            qo, ko = _like(q), _like(k)
        _launch(q, qo, k, ko, cos, sin, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.layouts = (qo.stride(), ko.stride())
        return qo, ko

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        if dq.stride(-1) != 1:
            dq = dq.contiguous()
        if dk.stride(-1) != 1:
            dk = dk.contiguous()
        q_layout, k_layout = ctx.layouts
        dq_in, dk_in = _like(dq, q_layout), _like(dk, k_layout)
        _launch(dq, dq_in, dk, dk_in, cos, sin, backward=True)
        return dq_in, dk_in, None, None, None


# -------------------------------------------------------------------------------------- reference


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb with unsqueeze_dim=1 (q, k: [B, H, S, D]; cos, sin: [B, S, D])."""
    cos, sin = _cos_sin_3d(cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# ----------------------------------------------------------------------------------------- public


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inplace: bool = False):
    """Rotate q and k by (cos, sin) in one kernel launch; returns (q_rot, k_rot).

    q: [B, Hq, S, D], k: [B, Hk, S, D] (HF's layout after ``.transpose(1, 2)``: any strides with the last
    dimension contiguous); cos, sin: [S, D], [B or 1, S, D] or [B or 1, 1, S, D], as the model's rotary
    embedding returns them. Differentiable in q and k (not in cos/sin).

    inplace=True lets the op write over q and k (no new buffer) where that is safe: always without
    autograd, and under autograd when q and k are not views (autograd refuses in-place writes to views
    in a Function with two outputs; HF's transposed q/k are views, so they get fresh outputs). Use the
    returned tensors either way.
    """
    cos3, sin3 = _cos_sin_3d(cos, sin)
    usable = (
        use_triton(q, k, cos3)
        and q.dim() == 4
        and k.dim() == 4
        and q.shape[-1] % 2 == 0
        and q.shape[-1] == k.shape[-1] == cos3.shape[-1]
        and q.shape[0] == k.shape[0]
        and q.shape[2] == k.shape[2] == cos3.shape[1]
        and cos3.shape[0] in (1, q.shape[0])
        and q.dtype == k.dtype
        and q.stride(-1) == 1
        and k.stride(-1) == 1
        and not (cos3.requires_grad or sin3.requires_grad)
    )
    if not usable:
        return rope_reference(q, k, cos, sin)
    tracked = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if not tracked:
        qo = q if inplace else _like(q)
        ko = k if inplace else _like(k)
        _launch(q, qo, k, ko, cos3, sin3, backward=False)
        return qo, ko
    leaf_needing_grad = (q.is_leaf and q.requires_grad) or (k.is_leaf and k.requires_grad)
    inplace = inplace and not (q._is_view() or k._is_view() or leaf_needing_grad)
    return RoPEFunction.apply(q, k, cos3, sin3, inplace)
