"""SwiGLU and GeGLU (tanh, erf) against silu/gelu(gate) * up: forward, d_gate, d_up; the LoRA entry points."""

import pytest
import torch
from forge.kernels import geglu, glu, glu_reference, swiglu
from forge.kernels.swiglu import glu_backward, glu_forward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

ACTS = ["silu", "gelu_tanh", "gelu"]


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_glu_matches_reference(kc, activation, dtype):
    torch.manual_seed(0)
    shape = (3, 7, 111)  # 2331 elements: three programs, the last one ragged
    gate = (torch.randn(shape, device=DEVICE) * 3).to(dtype).requires_grad_()
    up = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()
    h = glu(gate, up, activation)
    assert "GLU" in type(h.grad_fn).__name__
    gr, ur = gate.detach().float().requires_grad_(), up.detach().float().requires_grad_()
    hr = glu_reference(gr, ur, activation)
    tol = kc.tol[dtype]
    assert h.dtype == dtype
    kc.assert_close(h, hr, tol, "h")
    dh = torch.randn_like(hr)
    for a, b, name in zip(kc.grads(h, (gate, up), dh), kc.grads(hr, (gr, ur), dh), ("d_gate", "d_up"), strict=True):
        kc.assert_close(a, b, tol, name)


def test_named_wrappers(kc):
    g, u = torch.randn(2, 40, device=DEVICE), torch.randn(2, 40, device=DEVICE)
    kc.assert_close(swiglu(g, u), torch.nn.functional.silu(g) * u, kc.tol[torch.float32])
    kc.assert_close(geglu(g, u), torch.nn.functional.gelu(g, approximate="tanh") * u, kc.tol[torch.float32])
    kc.assert_close(geglu(g, u, "none"), torch.nn.functional.gelu(g) * u, kc.tol[torch.float32])
    kc.assert_close(glu(g, u, "gelu_pytorch_tanh"), geglu(g, u), 0.0 + 1e-12)
    with pytest.raises(ValueError):
        glu(g, u, "relu")


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("triton_on", [True, False], ids=["triton", "torch"])
def test_lora_entry_points(kc, activation, triton_on, monkeypatch):
    """glu_forward / glu_backward (what lora.py calls): h, d_gate, d_up; h written over dh on request."""
    if not triton_on:
        monkeypatch.setenv("FORGE_KERNELS", "off")
    torch.manual_seed(1)
    gate = torch.randn(5, 300, device=DEVICE) * 2
    up = torch.randn(5, 300, device=DEVICE)
    dh = torch.randn(5, 300, device=DEVICE)
    gr, ur = gate.clone().requires_grad_(), up.clone().requires_grad_()
    hr = glu_reference(gr, ur, activation)
    dgr, dur = torch.autograd.grad(hr, (gr, ur), dh)
    kc.assert_close(glu_forward(gate, up, activation), hr, kc.tol[torch.float32], "h")
    buf = dh.clone()
    h, dg, du = glu_backward(buf, gate, up, activation, h_into_dh=True)
    kc.assert_close(h, hr, kc.tol[torch.float32], "h (backward)")
    kc.assert_close(dg, dgr, kc.tol[torch.float32], "d_gate")
    kc.assert_close(du, dur, kc.tol[torch.float32], "d_up")
    if triton_on:
        assert h.data_ptr() == buf.data_ptr()


@pytest.mark.parametrize("triton_on", [True, False], ids=["triton", "torch"])
def test_backward_into_its_inputs_gives_the_same_gradients(triton_on, monkeypatch):
    """into_inputs: d_gate and d_up come back in gate's and up's buffers, the very values of a separate pair."""
    if not triton_on:
        monkeypatch.setenv("FORGE_KERNELS", "off")
    torch.manual_seed(2)
    gate, up, dh = (torch.randn(5, 300, device=DEVICE).to(torch.bfloat16) for _ in range(3))
    h, dg, du = glu_backward(dh.clone(), gate, up, "silu")
    gate_buf, up_buf = gate.clone(), up.clone()
    h2, dg2, du2 = glu_backward(dh.clone(), gate_buf, up_buf, "silu", into_inputs=True)
    assert torch.equal(h2, h) and torch.equal(dg2, dg) and torch.equal(du2, du)
    assert (dg2.data_ptr(), du2.data_ptr()) == (gate_buf.data_ptr(), up_buf.data_ptr())
    assert torch.equal(gate_buf, dg) and not torch.equal(gate_buf, gate)
