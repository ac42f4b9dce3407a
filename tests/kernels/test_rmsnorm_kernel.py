"""RMSNorm (Llama form and Gemma's 1 + w) against transformers' formulas: forward, dx, dw."""

import pytest
import torch
from forge.kernels import rms_norm, rms_norm_reference
from forge.kernels.rmsnorm import RMSNormFunction

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 5, 64), (7, 50)], ids=["pow2", "ragged"])
def test_rmsnorm_matches_reference(kc, shape, dtype, unit_offset):
    torch.manual_seed(0)
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype).requires_grad_()
    w = (torch.randn(shape[-1], device=DEVICE) * 0.5 + (0.0 if unit_offset else 1.0)).to(dtype).requires_grad_()
    y = rms_norm(x, w, 1e-6, unit_offset)
    assert y.grad_fn is not None and "RMSNorm" in type(y.grad_fn).__name__  # the kernel ran, not the reference
    # reference in fp32 on the same (rounded) inputs
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    yr = rms_norm_reference(xr, wr, 1e-6, unit_offset)
    tol = kc.tol[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    kc.assert_close(y, yr, tol, "y")
    dy = torch.randn_like(yr)
    dx, dw = kc.grads(y, (x, w), dy)
    dxr, dwr = kc.grads(yr, (xr, wr), dy)
    kc.assert_close(dx, dxr, tol, "dx")
    kc.assert_close(dw, dwr, tol * 4 if dtype == torch.bfloat16 else tol, "dw")  # bf16 dw: a sum over rows


def test_rmsnorm_bf16_matches_hf_rounding(kc):
    """Llama form: transformers rounds x*rstd to x's dtype before the weight multiply; so does the kernel."""
    torch.manual_seed(1)
    x = torch.randn(4, 128, device=DEVICE).bfloat16()
    w = torch.randn(128, device=DEVICE).bfloat16()
    y, yr = rms_norm(x, w), rms_norm_reference(x, w)
    kc.assert_close(y, yr, 1e-2, "y vs HF bf16")


def test_rmsnorm_frozen_weight_skips_dw(kc):
    x = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    w = torch.randn(32, device=DEVICE)
    y = RMSNormFunction.apply(x, w, 1e-5, False)
    (dx,) = kc.grads(y, (x,), torch.ones_like(y))
    xr = x.detach().requires_grad_()
    (dxr,) = kc.grads(rms_norm_reference(xr, w, 1e-5), (xr,), torch.ones_like(y))
    kc.assert_close(dx, dxr, kc.tol[torch.float32], "dx")


def test_rmsnorm_falls_back_without_triton(kc, monkeypatch):
    monkeypatch.setenv("FORGE_KERNELS", "off")
    x = torch.randn(2, 16, device=DEVICE, requires_grad=True)
    w = torch.ones(16, device=DEVICE)
    y = rms_norm(x, w)
    assert "RMSNorm" not in type(y.grad_fn).__name__
    kc.assert_close(y, rms_norm_reference(x, w), kc.tol[torch.float32])
