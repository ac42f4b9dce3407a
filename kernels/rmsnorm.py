"""RMSNorm over the last dimension, forward and backward, with Gemma's ``(1 + w)`` variant.

    y = x / sqrt(mean(x^2) + eps) * w            (Llama, Mistral, Qwen2/3)
    y = x / sqrt(mean(x^2) + eps) * (1 + w)      (Gemma 1/2/3: ``unit_offset=True``)

Rounding follows transformers exactly: the Llama form rounds the normalized x to x's dtype before the
multiply by w (``LlamaRMSNorm``: ``weight * hidden.to(input_dtype)``, output in the promoted dtype of
the two); the Gemma form stays in fp32 until the single cast to x's dtype (``GemmaRMSNorm``).

The forward saves x, w and the inverse rms of each row (one fp32 per row), never the normalized x.
Backward, with n = x * rstd and v = dy * w_eff:

    dx = rstd * (v - n * mean(v * n))        dw = sum over rows of dy * n
"""

from __future__ import annotations

import torch

from ._device import MAX_FUSED_SIZE, next_pow2, num_programs, row_warps, tl, triton, use_triton

# ----------------------------------------------------------------------------------------- Triton


@triton.jit
def _rmsnorm_fwd_kernel(
    X,
    W,
    Y,
    RSTD,
    stride_x,
    stride_y,
    n_cols,
    eps,
    UNIT_OFFSET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    n = x * rstd
    if UNIT_OFFSET:  # noqa: SIM108 (one branch per compiled variant)
        y = n * (1.0 + w)
    else:
        y = n.to(X.dtype.element_ty).to(tl.float32) * w
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rmsnorm_bwd_kernel(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PART,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    rows_per_program,
    UNIT_OFFSET: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Persistent: program p handles rows [p * rows_per_program, ...) and keeps its share of dw in registers.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        w = w + 1.0
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 bounds -> int64 row offsets
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r in range(row_start, row_end):
        dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r)
        n = x * rstd
        v = dy * w
        dx = rstd * (v - n * (tl.sum(v * n, axis=0) / n_cols))
        tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            if UNIT_OFFSET:
                dw += dy * n
            else:
                dw += dy * n.to(X.dtype.element_ty).to(tl.float32)
    if COMPUTE_DW:
        tl.store(DW_PART + pid * n_cols + cols, dw, mask=mask)


def _out_dtype(x: torch.Tensor, w: torch.Tensor, unit_offset: bool) -> torch.dtype:
    return x.dtype if unit_offset else torch.promote_types(x.dtype, w.dtype)


def _check_width(n_cols: int) -> int:
    block = next_pow2(n_cols)
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"rms_norm: rows of {n_cols} elements exceed the fused limit {MAX_FUSED_SIZE}")
    return block


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        n_rows, n_cols = x2.shape
        block = _check_width(n_cols)
        w = weight.contiguous()
        y = torch.empty((n_rows, n_cols), dtype=_out_dtype(x, weight, unit_offset), device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        if n_rows:
            _rmsnorm_fwd_kernel[(n_rows,)](
                x2,
                w,
                y,
                rstd,
                x2.stride(0),
                y.stride(0),
                n_cols,
                eps,
                UNIT_OFFSET=unit_offset,
                BLOCK=block,
                num_warps=row_warps(block),
            )
        ctx.save_for_backward(x2, w, rstd)
        ctx.unit_offset = unit_offset
        ctx.x_shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        block = next_pow2(n_cols)
        dy2 = dy.reshape(-1, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        need_dw = ctx.needs_input_grad[1]
        dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
        n_prog = max(1, min(n_rows, num_programs(x2.device)))
        rows_per_program = (n_rows + n_prog - 1) // n_prog if n_rows else 0
        dw_part = torch.empty((n_prog, n_cols), dtype=torch.float32, device=x2.device) if need_dw else dx
        if n_rows:
            _rmsnorm_bwd_kernel[(n_prog,)](
                dy2,
                x2,
                w,
                rstd,
                dx,
                dw_part,
                dy2.stride(0),
                x2.stride(0),
                dx.stride(0),
                n_rows,
                n_cols,
                rows_per_program,
                UNIT_OFFSET=ctx.unit_offset,
                COMPUTE_DW=need_dw,
                BLOCK=block,
                num_warps=row_warps(block),
            )
        dw = None
        if need_dw:
            dw = dw_part.sum(0).to(w.dtype) if n_rows else torch.zeros_like(w)
        return dx.view(ctx.x_shape), dw, None, None


# -------------------------------------------------------------------------------------- reference


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, unit_offset: bool = False):
    """transformers' LlamaRMSNorm (unit_offset=False) or GemmaRMSNorm (unit_offset=True), verbatim."""
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (n * (1.0 + weight.float())).type_as(x)
    return weight * n.to(x.dtype)


# ----------------------------------------------------------------------------------------- public


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, unit_offset: bool = False):
    """RMSNorm of x over its last dimension.

    x: [..., D] (any float dtype); weight: [D]; eps: added to mean(x^2);
    unit_offset: Gemma's form, scale by (1 + weight). Output: x's shape; dtype as transformers gives it
    (Llama form: promote(x.dtype, weight.dtype); Gemma form: x.dtype). Differentiable in x and weight.
    """
    if not use_triton(x, weight) or next_pow2(x.shape[-1]) > MAX_FUSED_SIZE:
        return rms_norm_reference(x, weight, eps, unit_offset)
    return RMSNormFunction.apply(x, weight, float(eps), bool(unit_offset))
