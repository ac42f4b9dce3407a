"""Fused LoRA (MLP, QKV, single projection) against PEFT's formula in plain autograd: the output and
the gradients of x and of every A and B; dense and NF4 frozen weights; with and without Triton."""

import pytest
import torch
from forge.kernels import (
    LoRAProj,
    NF4Weight,
    lora_linear,
    lora_mlp,
    lora_mlp_reference,
    lora_proj_reference,
    lora_qkv,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

HIDDEN, INTER, RANK = 64, 96, 4


def _proj(out_f, in_f, *, nf4=False, adapter=True, bias=False, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) * in_f**-0.5).to(DEVICE)
    if nf4:
        bnbf = pytest.importorskip("bitsandbytes.functional")
        packed, state = bnbf.quantize_4bit(w.to(dtype), blocksize=64, compress_statistics=True, quant_type="nf4")
        weight = NF4Weight.from_bnb(packed, state)
    else:
        weight = w.to(dtype)
    A = B = None
    if adapter:  # fp32 masters, as PEFT keeps them; B nonzero so every gradient is exercised
        A = (torch.randn(RANK, in_f, generator=g) * 0.2).to(DEVICE).requires_grad_()
        B = (torch.randn(out_f, RANK, generator=g) * 0.2).to(DEVICE).requires_grad_()
    b = (torch.randn(out_f, generator=g) * 0.1).to(DEVICE, dtype) if bias else None
    return LoRAProj(weight, A, B, 2.0, b)


def _adapter_tensors(*projs):
    return [t for p in projs for t in (p.A, p.B) if t is not None]


def _x(dtype, seed=1):
    torch.manual_seed(seed)
    return torch.randn(2, 3, HIDDEN, device=DEVICE).to(dtype).requires_grad_()


def _check(kc, out, ref, inputs, tol):
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    for i, (o, r) in enumerate(zip(outs, refs, strict=True)):
        assert o.shape == r.shape
        kc.assert_close(o, r, tol, f"output {i}")
    g = [torch.randn_like(r.float()) for r in refs]
    for i, (a, b) in enumerate(zip(kc.grads(outs, inputs, g), kc.grads(refs, inputs, g), strict=True)):
        assert a.dtype == inputs[i].dtype
        kc.assert_close(a, b, tol, f"grad of input {i}")


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv("FORGE_KERNELS", "off")
    return request.param


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_lora_mlp(kc, activation, nf4, backend):
    gate = _proj(INTER, HIDDEN, nf4=nf4, seed=10)
    up = _proj(INTER, HIDDEN, nf4=nf4, adapter=False, seed=11)  # an untargeted module: plain frozen linear
    down = _proj(HIDDEN, INTER, nf4=nf4, seed=12)
    x = _x(torch.float32)
    y = lora_mlp(x, gate, up, down, activation)
    assert "LoRAMLP" in type(y.grad_fn).__name__
    _check(
        kc,
        y,
        lora_mlp_reference(x, gate, up, down, activation),
        [x, *_adapter_tensors(gate, up, down)],
        kc.tol[torch.float32],
    )


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_lora_qkv(kc, nf4, backend):
    q = _proj(HIDDEN, HIDDEN, nf4=nf4, bias=True, seed=20)  # Qwen2 has q/k/v biases
    k = _proj(32, HIDDEN, nf4=nf4, adapter=False, bias=True, seed=21)
    v = _proj(32, HIDDEN, nf4=nf4, seed=22)
    x = _x(torch.float32)
    out = lora_qkv(x, q, k, v)
    ref = tuple(lora_proj_reference(x, p) for p in (q, k, v))
    _check(kc, out, ref, [x, *_adapter_tensors(q, k, v)], kc.tol[torch.float32])


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_lora_linear(kc, nf4, backend):
    o = _proj(HIDDEN, HIDDEN, nf4=nf4, seed=30)
    x = _x(torch.float32)
    _check(kc, lora_linear(x, o), lora_proj_reference(x, o), [x, o.A, o.B], kc.tol[torch.float32])


def test_lora_mlp_bf16(kc):
    """bf16 activations and frozen weights, fp32 adapters: against the fp32 computation on the same values."""
    gate, up, down = (
        _proj(INTER, HIDDEN, dtype=torch.bfloat16, seed=40),
        _proj(INTER, HIDDEN, dtype=torch.bfloat16, seed=41),
        _proj(HIDDEN, INTER, dtype=torch.bfloat16, seed=42),
    )
    x = _x(torch.bfloat16)
    y = lora_mlp(x, gate, up, down, "silu")
    assert y.dtype == torch.bfloat16
    as32 = [p._replace(weight=p.weight.float()) for p in (gate, up, down)]
    x32 = x.detach().float().requires_grad_()
    ref = lora_mlp_reference(x32, *as32, "silu")
    kc.assert_close(y, ref, kc.tol[torch.bfloat16], "y")
    g = torch.randn_like(ref)
    params = _adapter_tensors(gate, up, down)
    got = kc.grads(y, [x, *params], g)
    exp = kc.grads(ref, [x32, *params], g)
    for i, (a, b) in enumerate(zip(got, exp, strict=True)):
        kc.assert_close(a, b, kc.tol[torch.bfloat16], f"grad {i}")


def test_autocast_computes_in_autocast_dtype(kc):
    o = _proj(HIDDEN, HIDDEN, seed=50)
    x = _x(torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = lora_linear(x, o)
    assert y.dtype == torch.bfloat16
    (dx, dA) = kc.grads(y, [x, o.A], torch.ones_like(y))
    assert dx.dtype == torch.float32 and dA.dtype == torch.float32
    ref = lora_proj_reference(x, o)
    kc.assert_close(y, ref, kc.tol[torch.bfloat16], "y")


def test_frozen_weight_is_required(kc):
    o = _proj(HIDDEN, HIDDEN, seed=60)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(_x(torch.float32), o._replace(weight=o.weight.clone().requires_grad_()))
    with pytest.raises(ValueError, match="both A and B"):
        lora_linear(_x(torch.float32), o._replace(B=None))
