"""Gated MLP activations: SwiGLU and GeGLU (tanh and erf), forward and backward.

    h = act(gate) * up
    act = silu (SwiGLU: Llama, Mistral, Qwen2/3), gelu tanh (GeGLU: Gemma's ``gelu_pytorch_tanh``)
          or gelu erf (GeGLU with exact ``gelu``)

Backward:  d_up = dh * act(gate),   d_gate = dh * up * act'(gate)

    silu'(e)      = s (1 + e (1 - s)),  s = sigmoid(e)
    gelu_erf'(e)  = Phi(e) + e phi(e)
    gelu_tanh'(e) = 0.5 (1 + t) + 0.5 e (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 e^2),
                    t = tanh(sqrt(2/pi) (e + 0.044715 e^3))

Math runs in fp32; act(gate) is rounded to the output dtype before the multiply by up, as transformers'
``act_fn(gate_proj(x)) * up_proj(x)`` does in bf16. The backward kernel also recomputes h, which the
fused LoRA MLP (lora.py) needs for its down projection, so h is never saved between passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._device import tl, triton, use_triton

# Activation codes shared by the kernels and lora.py.
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}
# transformers' ACT2FN names (config.hidden_act / hidden_activation) -> ours.
HF_ACT_NAMES = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}

BLOCK = 1024  # elements per program: 8 bf16 per thread at 4 warps, full 128-bit loads

_SQRT_2_OVER_PI = 0.7978845608028654
_INV_SQRT_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_GELU_C = 0.044715

# ----------------------------------------------------------------------------------------- Triton


@triton.jit
def _act_and_grad(e, ACT: tl.constexpr):
    """(act(e), act'(e)) in fp32 for ACT 0 = silu, 1 = gelu tanh, 2 = gelu erf."""
    if ACT == 0:
        s = tl.sigmoid(e)
        f = e * s
        df = s * (1.0 + e * (1.0 - s))
    elif ACT == 1:
        inner = 0.7978845608028654 * (e + 0.044715 * e * e * e)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh, in a form every backend (and the interpreter) has
        f = 0.5 * e * (1.0 + t)
        df = 0.5 * (1.0 + t) + 0.5 * e * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * e * e)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(e * 0.7071067811865476))
        f = e * cdf
        df = cdf + e * 0.3989422804014327 * tl.exp(-0.5 * e * e)
    return f, df


@triton.jit
def _glu_fwd_kernel(E, G, H, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    e = tl.load(E + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    f, _ = _act_and_grad(e, ACT)
    h = f.to(H.dtype.element_ty).to(tl.float32) * g
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(DH, E, G, H, DE, DG, n, ACT: tl.constexpr, STORE_H: tl.constexpr, BLOCK: tl.constexpr):
    # Each element is read before it is written, so an output may alias an input (H into DH, say).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(E + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    f, df = _act_and_grad(e, ACT)
    f_r = f.to(H.dtype.element_ty).to(tl.float32)
    if STORE_H:
        tl.store(H + offs, (f_r * g).to(H.dtype.element_ty), mask=mask)
    tl.store(DE + offs, (dh * g * df).to(DE.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dh * f_r).to(DG.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------- torch versions of the kernels


def _act_and_grad_torch(e: torch.Tensor, act: int):
    if act == 0:
        s = torch.sigmoid(e)
        return e * s, s * (1.0 + e * (1.0 - s))
    if act == 1:
        t = torch.tanh(_SQRT_2_OVER_PI * (e + _GELU_C * e * e * e))
        f = 0.5 * e * (1.0 + t)
        return f, 0.5 * (1.0 + t) + 0.5 * e * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * e * e)
    cdf = 0.5 * (1.0 + torch.erf(e * _INV_SQRT_2))
    return e * cdf, cdf + e * _INV_SQRT_2PI * torch.exp(-0.5 * e * e)


def _act_code(activation: str) -> int:
    name = HF_ACT_NAMES.get(activation, activation)
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported GLU activation {activation!r}; known: {sorted(HF_ACT_NAMES)}")
    return ACTIVATIONS[name]


# ------------------------------------------------ kernel entry points (no autograd; used by lora.py)


def glu_forward(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """h = act(gate) * up without autograd; gate and up have one shape."""
    act = _act_code(activation)
    gate, up = gate.contiguous(), up.contiguous()
    if not use_triton(gate, up):
        f, _ = _act_and_grad_torch(gate.float(), act)
        return (f.to(gate.dtype).float() * up.float()).to(gate.dtype)
    h = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _glu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, h, n, ACT=act, BLOCK=BLOCK, num_warps=4)
    return h


def glu_backward(
    dh: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str = "silu",
    h_into_dh: bool = False,
    need_h: bool = True,
    into_inputs: bool = False,
):
    """(h, d_gate, d_up) for h = act(gate) * up, without autograd.

    h_into_dh=True writes h over dh (which the caller owns and no longer needs): one buffer less.
    need_h=False: the caller kept h from the forward; h is neither recomputed nor written (None is returned).
    into_inputs=True returns d_gate and d_up in gate's and up's buffers (contiguous ones; the caller owns both
    and no longer needs them): two buffers less.
    """
    act = _act_code(activation)
    dh, gate, up = dh.contiguous(), gate.contiguous(), up.contiguous()
    if not use_triton(dh, gate, up):
        e, g, d = gate.float(), up.float(), dh.float()
        f, df = _act_and_grad_torch(e, act)
        f_r = f.to(gate.dtype).float()
        h = (f_r * g).to(gate.dtype) if need_h else None
        de, dg = (d * g * df).to(gate.dtype), (d * f_r).to(up.dtype)
        return (h, gate.copy_(de), up.copy_(dg)) if into_inputs else (h, de, dg)
    h = (dh if h_into_dh else torch.empty_like(gate)) if need_h else None
    de = gate if into_inputs else torch.empty_like(gate)
    dg = up if into_inputs else torch.empty_like(up)
    n = gate.numel()
    if n:
        _glu_bwd_kernel[(triton.cdiv(n, BLOCK),)](
            dh, gate, up, dh if h is None else h, de, dg, n, ACT=act, STORE_H=need_h, BLOCK=BLOCK, num_warps=4
        )
    return h, de, dg


class GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act: int):
        gate, up = gate.contiguous(), up.contiguous()
        h = torch.empty_like(gate)
        n = gate.numel()
        if n:
            _glu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, h, n, ACT=act, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate, up = ctx.saved_tensors
        dh = dh.contiguous()
        de = torch.empty_like(gate)
        dg = torch.empty_like(up)
        n = gate.numel()
        if n:
            _glu_bwd_kernel[(triton.cdiv(n, BLOCK),)](
                dh, gate, up, dh, de, dg, n, ACT=ctx.act, STORE_H=False, BLOCK=BLOCK, num_warps=4
            )
        return de, dg, None


# -------------------------------------------------------------------------------------- reference


def glu_reference(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """transformers' ``act_fn(gate) * up``."""
    act = _act_code(activation)
    if act == 0:
        return F.silu(gate) * up
    return F.gelu(gate, approximate="tanh" if act == 1 else "none") * up


# ----------------------------------------------------------------------------------------- public


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """act(gate) * up for gate, up of one shape and dtype. activation: "silu", "gelu_tanh" or "gelu",
    or a transformers name ("gelu_pytorch_tanh", "swish", ...). Differentiable in gate and up."""
    act = _act_code(activation)
    if not use_triton(gate, up) or gate.shape != up.shape or gate.dtype != up.dtype:
        return glu_reference(gate, up, activation)
    return GLUFunction.apply(gate, up, act)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Llama, Mistral, Qwen2/3 MLP)."""
    return glu(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """gelu(gate) * up; approximate="tanh" (Gemma's gelu_pytorch_tanh) or "none" (exact erf gelu)."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', not {approximate!r}")
    return glu(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")
