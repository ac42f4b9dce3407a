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
MLP_SHAPES = ((INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER))  # (out, in) of gate, up, down


def _proj(
    out_f,
    in_f,
    *,
    nf4=False,
    adapter=True,
    bias=False,
    dtype=torch.float32,
    seed=0,
    rank=RANK,
    scaling=2.0,
    adapter_dtype=torch.float32,
):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) * in_f**-0.5).to(DEVICE)
    if nf4:
        bnbf = pytest.importorskip("bitsandbytes.functional")
        packed, state = bnbf.quantize_4bit(w.to(dtype), blocksize=64, compress_statistics=True, quant_type="nf4")
        weight = NF4Weight.from_bnb(packed, state)
    else:
        weight = w.to(dtype)
    A = B = None
    if adapter:  # fp32 masters by default, as PEFT keeps them; B nonzero so every gradient is exercised
        A = (torch.randn(rank, in_f, generator=g) * 0.2).to(DEVICE, adapter_dtype).requires_grad_()
        B = (torch.randn(out_f, rank, generator=g) * 0.2).to(DEVICE, adapter_dtype).requires_grad_()
    b = (torch.randn(out_f, generator=g) * 0.1).to(DEVICE, dtype) if bias else None
    return LoRAProj(weight, A, B, scaling, b)


def _adapter_tensors(*projs):
    return [t for p in projs for t in (p.A, p.B) if t is not None]


def _x(dtype, seed=1):
    torch.manual_seed(seed)
    return torch.randn(2, 3, HIDDEN, device=DEVICE).to(dtype).requires_grad_()


def _mlp_runs(projs, inputs, dy, calls, *variants):
    """For each variant's keyword arguments: lora_mlp's output (x = inputs[0]), the gradients of `inputs` for
    the output gradient dy, and what `calls` recorded during both (cleared before each)."""
    runs = []
    for kwargs in variants:
        calls.clear()
        y = lora_mlp(inputs[0], *projs, "silu", **kwargs)
        runs.append((y, torch.autograd.grad(y, inputs, dy), list(calls)))
    return runs


def _assert_equal_gradients(grads, others, how):
    for i, (a, b) in enumerate(zip(grads, others, strict=True)):
        assert torch.equal(a, b), f"gradient {i} differs {how}"


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


@pytest.fixture
def concat(monkeypatch):
    """The A_cat decisions (`_concat`) the Functions make during a test, in call order: the shared-input
    cases below assert which path they ran, so each keeps covering the branch it is named for."""
    import forge.kernels.lora as lora

    seen = []
    real = lora._concat

    def spy(adapters):
        seen.append(real(adapters))
        return seen[-1]

    monkeypatch.setattr(lora, "_concat", spy)
    return seen


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


@pytest.mark.parametrize("down_adapter", [True, False], ids=["down_lora", "down_frozen"])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_lora_mlp_keep_h_gives_the_same_values(nf4, down_adapter, backend):
    """keep_h (h and h A_d^T saved by the forward, not recomputed): the output and every gradient are the
    very same bf16 values as without it, and the backward graph saves h."""
    gate, up, down = (
        _proj(o, i, nf4=nf4, dtype=torch.bfloat16, seed=120 + n, adapter=n < 2 or down_adapter)
        for n, (o, i) in enumerate(MLP_SHAPES)
    )
    x = _x(torch.bfloat16)
    inputs = [x, *_adapter_tensors(gate, up, down)]
    runs = []
    for keep_h in (False, True):
        y = lora_mlp(x, gate, up, down, "silu", keep_h=keep_h)
        saved = [t.shape for t in y.grad_fn.saved_tensors if t is not None]
        grads = torch.autograd.grad(y, inputs, torch.ones_like(y))
        runs.append((y, grads, saved))
    (y0, g0, saved0), (y1, g1, saved1) = runs
    assert torch.equal(y0, y1)
    for i, (a, b) in enumerate(zip(g0, g1, strict=True)):
        assert torch.equal(a, b), f"gradient {i} differs with keep_h"
    assert saved0.count((6, INTER)) == 2  # e and g
    assert saved1.count((6, INTER)) == 3  # and h


@pytest.mark.parametrize("keep_h", [False, True], ids=["recompute_h", "keep_h"])
@pytest.mark.parametrize("down_adapter", [True, False], ids=["down_lora", "down_frozen"])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_lora_mlp_without_output_gives_the_same_gradients(nf4, down_adapter, keep_h, backend, monkeypatch):
    """compute_output=False (a recomputation whose output is thrown away): zeros out, the down projection
    never runs, and every gradient is the very same bf16 value as with the output computed."""
    import forge.kernels.lora as lora

    gate, up, down = (
        _proj(o, i, nf4=nf4, dtype=torch.bfloat16, seed=130 + n, adapter=n < 2 or down_adapter)
        for n, (o, i) in enumerate(MLP_SHAPES)
    )
    x = _x(torch.bfloat16)
    inputs = [x, *_adapter_tensors(gate, up, down)]
    forwards = []  # the input width of every projection group run in a forward: HIDDEN (gate/up) or INTER (down)
    real = lora._shared_fwd
    monkeypatch.setattr(lora, "_shared_fwd", lambda x2, *a: forwards.append(x2.shape[1]) or real(x2, *a))
    dy = torch.randn(2, 3, HIDDEN, device=DEVICE).to(torch.bfloat16)
    (y_full, g_full, f_full), (y_none, g_none, f_none) = _mlp_runs(
        (gate, up, down), inputs, dy, forwards, dict(keep_h=keep_h), dict(keep_h=keep_h, compute_output=False)
    )
    assert (f_full, f_none) == ([HIDDEN, INTER], [HIDDEN])
    assert y_none.shape == y_full.shape and not y_none.any() and y_full.any()
    _assert_equal_gradients(g_full, g_none, "without the output")


@pytest.mark.parametrize("compute_output", [True, False], ids=["output", "no_output"])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_lora_mlp_with_the_up_output_of_an_earlier_forward(nf4, compute_output, backend, monkeypatch):
    """on_up_output hands out the up projection's output; a later forward given it as up_output skips the
    up GEMM (only gate's runs) and gives the very same output and gradients, its backward free to write it."""
    import forge.kernels.lora as lora

    gate, up, down = (_proj(o, i, nf4=nf4, dtype=torch.bfloat16, seed=150 + n) for n, (o, i) in enumerate(MLP_SHAPES))
    x = _x(torch.bfloat16)
    inputs = [x, *_adapter_tensors(gate, up, down)]
    widths = []  # the output width of every frozen GEMM the forwards run
    real = lora._proj_out
    monkeypatch.setattr(lora, "_proj_out", lambda x2, p, *a: widths.append(p.weight.shape[0]) or real(x2, p, *a))
    dy = torch.randn(2, 3, HIDDEN, device=DEVICE).to(torch.bfloat16)
    kept = []
    with torch.no_grad():
        lora_mlp(x, gate, up, down, "silu", on_up_output=kept.append)
    assert len(kept) == 1 and kept[0].shape == (6, INTER)
    up_output = kept[0].clone()
    plain, given = dict(compute_output=compute_output), dict(compute_output=compute_output, up_output=up_output)
    (y_ref, g_ref, w_ref), (y_up, g_up, w_up) = _mlp_runs((gate, up, down), inputs, dy, widths, plain, given)
    down_gemm = [HIDDEN] if compute_output else []
    assert (w_ref, w_up) == ([INTER, INTER, *down_gemm], [INTER, *down_gemm])
    assert torch.equal(y_ref, y_up)
    _assert_equal_gradients(g_ref, g_up, "with the given up output")


def test_lora_mlp_backward_twice_fails_loudly(backend):
    """The MLP's backward writes its gate/up gradients over the saved gate/up outputs: a second backward
    through the same graph raises rather than reading them."""
    gate, up, down = (_proj(o, i, dtype=torch.bfloat16, seed=160 + n) for n, (o, i) in enumerate(MLP_SHAPES))
    x = _x(torch.bfloat16)
    y = lora_mlp(x, gate, up, down, "silu")
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_lora_qkv(kc, nf4, backend):
    q = _proj(HIDDEN, HIDDEN, nf4=nf4, bias=True, seed=20)  # Qwen2 has q/k/v biases
    k = _proj(32, HIDDEN, nf4=nf4, adapter=False, bias=True, seed=21)
    v = _proj(32, HIDDEN, nf4=nf4, seed=22)
    x = _x(torch.float32)
    out = lora_qkv(x, q, k, v)
    ref = tuple(lora_proj_reference(x, p) for p in (q, k, v))
    _check(kc, out, ref, [x, *_adapter_tensors(q, k, v)], kc.tol[torch.float32])


QKV_CASES = {  # per projection (q, k, v): (rank or None for no adapter, scaling, bias)
    "ranks": ((4, 2.0, True), (8, 0.5, True), (2, 1.0, True)),  # A_cat with ranks that differ
    "ranks_nobias": ((6, 0.25, False), (4, 2.0, False), (4, 2.0, False)),
    "q_only": ((4, 2.0, True), (None, 1.0, True), (None, 1.0, False)),
    "kv_only": ((None, 1.0, False), (3, 0.5, True), (5, 4.0, False)),
}


@pytest.mark.parametrize("case", list(QKV_CASES))
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_lora_qkv_shared_input(kc, case, nf4, backend, concat):
    """q, k, v: the A_cat path when all three have adapters (ranks and scalings differing, with and without
    biases), per projection when only some have one."""
    q, k, v = (
        _proj(o, HIDDEN, nf4=nf4, adapter=r is not None, bias=b, seed=80 + n, rank=r or RANK, scaling=s)
        for n, (o, (r, s, b)) in enumerate(zip((HIDDEN, 32, 48), QKV_CASES[case], strict=True))
    )
    x = _x(torch.float32)
    out = lora_qkv(x, q, k, v)
    assert concat == [case.startswith("ranks")]
    ref = tuple(lora_proj_reference(x, p) for p in (q, k, v))
    _check(kc, out, ref, [x, *_adapter_tensors(q, k, v)], kc.tol[torch.float32])


MLP_CASES = {  # per projection (gate, up, down): (rank or None for no adapter, scaling)
    "ranks": ((4, 2.0), (8, 0.5), (6, 1.0)),  # gate+up through A_cat with ranks that differ
    "gate_up_only": ((2, 4.0), (5, 0.25), (None, 1.0)),
    "up_and_down": ((None, 1.0), (4, 2.0), (3, 0.5)),
}


@pytest.mark.parametrize("case", list(MLP_CASES))
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_lora_mlp_shared_input(kc, case, nf4, backend, concat):
    """gate and up: the A_cat path when both have adapters (ranks and scalings differing), per projection
    when only one has; down with or without one."""
    gate, up, down = (
        _proj(o, i, nf4=nf4, adapter=r is not None, seed=90 + n, rank=r or RANK, scaling=s)
        for n, ((o, i), (r, s)) in enumerate(zip(MLP_SHAPES, MLP_CASES[case], strict=True))
    )
    x = _x(torch.float32)
    y = lora_mlp(x, gate, up, down, "silu")
    assert concat == [case != "up_and_down", False]
    ref = lora_mlp_reference(x, gate, up, down, "silu")
    _check(kc, y, ref, [x, *_adapter_tensors(gate, up, down)], kc.tol[torch.float32])


def test_lora_frozen_adapter_and_input(kc, concat):
    """Gradients only for what requires them: a frozen k adapter and an input without grad, on the A_cat
    path (q, k, v) and beside it (gate, up with a frozen gate A)."""
    q, k, v = (_proj(o, HIDDEN, seed=100 + n, rank=2 + 2 * n) for n, o in enumerate((HIDDEN, 32, 32)))
    k.A.requires_grad_(False)
    k.B.requires_grad_(False)
    x = _x(torch.float32).detach()
    out = lora_qkv(x, q, k, v)
    ref = tuple(lora_proj_reference(x, p) for p in (q, k, v))
    _check(kc, out, ref, [q.A, q.B, v.A, v.B], kc.tol[torch.float32])

    gate, up, down = (_proj(o, i, seed=110 + n) for n, (o, i) in enumerate(MLP_SHAPES))
    gate.A.requires_grad_(False)
    y = lora_mlp(x, gate, up, down, "silu")
    _check(
        kc,
        y,
        lora_mlp_reference(x, gate, up, down, "silu"),
        [gate.B, up.A, up.B, down.A, down.B],
        kc.tol[torch.float32],
    )
    assert concat == [True, True, False]


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_lora_linear(kc, nf4, backend):
    o = _proj(HIDDEN, HIDDEN, nf4=nf4, seed=30)
    x = _x(torch.float32)
    _check(kc, lora_linear(x, o), lora_proj_reference(x, o), [x, o.A, o.B], kc.tol[torch.float32])


def _check_bf16(kc, out, ref, x, x32, params):
    """bf16 outputs and gradients (of x and params) against the fp32 computation on the same values."""
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    for i, (o, r) in enumerate(zip(outs, refs, strict=True)):
        assert o.dtype == torch.bfloat16
        kc.assert_close(o, r, kc.tol[torch.bfloat16], f"output {i}")
    g = [torch.randn_like(r) for r in refs]
    got = kc.grads(outs, [x, *params], g)
    exp = kc.grads(refs, [x32, *params], g)
    for i, (a, b) in enumerate(zip(got, exp, strict=True)):
        assert a.dtype == ([x, *params][i]).dtype
        kc.assert_close(a, b, kc.tol[torch.bfloat16], f"grad {i}")


def _as32(*projs):
    return [p._replace(weight=p.weight.float(), bias=None if p.bias is None else p.bias.float()) for p in projs]


@pytest.mark.parametrize(("ranks", "scalings"), [((4, 4, 4), (2.0, 2.0, 2.0)), ((4, 8, 2), (2.0, 0.5, 1.0))])
def test_lora_mlp_bf16(kc, ranks, scalings, concat):
    """bf16 activations and frozen weights, fp32 adapters (gate and up through A_cat, equal ranks or not)."""
    gate, up, down = (
        _proj(o, i, dtype=torch.bfloat16, seed=40 + n, rank=r, scaling=s)
        for n, ((o, i), r, s) in enumerate(zip(MLP_SHAPES, ranks, scalings, strict=True))
    )
    x = _x(torch.bfloat16)
    y = lora_mlp(x, gate, up, down, "silu")
    assert concat == [True, False]  # gate+up concatenated; down alone
    x32 = x.detach().float().requires_grad_()
    ref = lora_mlp_reference(x32, *_as32(gate, up, down), "silu")
    _check_bf16(kc, y, ref, x, x32, _adapter_tensors(gate, up, down))


@pytest.mark.parametrize("case", ["ranks", "some", "mixed_dtypes"])
def test_lora_qkv_bf16(kc, case, concat):
    """bf16 QKV with biases: A_cat over ranks 4/8/2 and scalings 2/0.5/1; k without an adapter; and q's
    adapter in bf16 beside fp32 k and v (A dtypes differ: per projection)."""
    ranks, scalings = (4, 8, 2), (2.0, 0.5, 1.0)
    q, k, v = (
        _proj(
            o,
            HIDDEN,
            dtype=torch.bfloat16,
            bias=True,
            seed=70 + n,
            rank=ranks[n],
            scaling=scalings[n],
            adapter=not (case == "some" and n == 1),
            adapter_dtype=torch.bfloat16 if case == "mixed_dtypes" and n == 0 else torch.float32,
        )
        for n, o in enumerate((HIDDEN, 32, 32))
    )
    x = _x(torch.bfloat16)
    out = lora_qkv(x, q, k, v)
    assert concat == [case == "ranks"]
    x32 = x.detach().float().requires_grad_()
    ref = tuple(lora_proj_reference(x32, p) for p in _as32(q, k, v))
    _check_bf16(kc, out, ref, x, x32, _adapter_tensors(q, k, v))


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


def test_compute_copies_are_kept_within_a_block_only():
    """Outside `keep_compute_copies` every call copies; inside, one copy per parts/dtype/scaling, dropped at
    the block's end (a new block copies the parameters as they are then)."""
    from forge.kernels import keep_compute_copies
    from forge.kernels.lora import compute_copy

    a1, a2 = (torch.randn(4, HIDDEN, device=DEVICE, requires_grad=True) for _ in range(2))
    assert compute_copy((a1,), torch.float32) is a1  # nothing to copy
    assert compute_copy((a1, a2), torch.bfloat16) is not compute_copy((a1, a2), torch.bfloat16)
    with keep_compute_copies():
        kept = compute_copy((a1, a2), torch.bfloat16, 0.5)
        assert torch.equal(kept, (torch.cat([a1, a2]) * 0.5).to(torch.bfloat16)) and not kept.requires_grad
        assert compute_copy((a1, a2), torch.bfloat16, 0.5) is kept
        assert compute_copy((a1, a2), torch.bfloat16, 2.0) is not kept  # another scaling, another copy
        assert compute_copy((a2, a1), torch.bfloat16, 0.5) is not kept
        with keep_compute_copies():
            assert compute_copy((a1, a2), torch.bfloat16, 0.5) is kept  # nested: the outer block's copies
        with torch.inference_mode():
            compute_copy((a1,), torch.float16)
        assert not compute_copy((a1,), torch.float16).is_inference()  # an inference tensor is never kept
    with torch.no_grad():
        a2.mul_(2)
    with keep_compute_copies():
        assert torch.equal(compute_copy((a1, a2), torch.bfloat16, 0.5), (torch.cat([a1, a2]) * 0.5).to(torch.bfloat16))


def test_refreshed_copies_equal_new_copies_bit_for_bit():
    """After an in-place update, `refresh_compute_copies` rewrites each kept copy (one part or several,
    any scaling) to exactly what a new copy would be, in the same tensor."""
    from forge.kernels import keep_compute_copies, refresh_compute_copies
    from forge.kernels.lora import compute_copy

    g = torch.Generator(device="cpu").manual_seed(5)
    parts = [torch.randn(r, HIDDEN, generator=g).to(DEVICE).requires_grad_() for r in (4, 8, 2)]
    calls = [(parts, 1.0), (parts[:1], 0.5), (parts[1:2], 1 / 3), (parts[2:], 2.7)]
    with keep_compute_copies():
        kept = [compute_copy(p, torch.bfloat16, s) for p, s in calls]
        with torch.no_grad():
            for p in parts:
                p.add_(torch.randn(p.shape, generator=g).to(DEVICE))
        refresh_compute_copies()
        for (p, s), copy in zip(calls, kept, strict=True):
            assert compute_copy(p, torch.bfloat16, s) is copy
    for (p, s), copy in zip(calls, kept, strict=True):  # outside the block: new copies of the updated values
        assert torch.equal(copy, compute_copy(p, torch.bfloat16, s))
