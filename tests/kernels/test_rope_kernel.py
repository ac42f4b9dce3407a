"""RoPE for q and k together against transformers' apply_rotary_pos_emb: forward, dq, dk; in-place rules."""

import pytest
import torch
from forge.kernels import apply_rope, rope_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cos_sin(bc, seq, dim, dtype):
    # HF's table: cat(freqs, freqs); per-batch positions when bc > 1
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=DEVICE).float() / dim))
    pos = torch.arange(seq, device=DEVICE).float()[None, :] + torch.arange(bc, device=DEVICE)[:, None] * 3
    f = pos[..., None] * inv
    emb = torch.cat((f, f), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bc", [1, 2], ids=["shared-pos", "per-batch-pos"])
def test_rope_matches_reference(kc, bc, dtype):
    torch.manual_seed(0)
    bsz, seq, hq, hk, dim = 2, 5, 4, 2, 16
    # HF layout: projections [B, S, H*D] viewed [B, S, H, D] then transposed to [B, H, S, D] (a view)
    q_lin = torch.randn(bsz, seq, hq * dim, device=DEVICE).to(dtype).requires_grad_()
    k_lin = torch.randn(bsz, seq, hk * dim, device=DEVICE).to(dtype).requires_grad_()
    cos, sin = _cos_sin(bc, seq, dim, dtype)
    q = (q_lin * 1).view(bsz, seq, hq, dim).transpose(1, 2)
    k = (k_lin * 1).view(bsz, seq, hk, dim).transpose(1, 2)
    qo, ko = apply_rope(q, k, cos, sin, inplace=True)
    assert "RoPE" in type(qo.grad_fn).__name__
    ql, kl = q_lin.detach().float().requires_grad_(), k_lin.detach().float().requires_grad_()
    qr, kr = rope_reference(
        ql.view(bsz, seq, hq, dim).transpose(1, 2), kl.view(bsz, seq, hk, dim).transpose(1, 2), cos.float(), sin.float()
    )
    tol = kc.tol[dtype]
    kc.assert_close(qo, qr, tol, "q")
    kc.assert_close(ko, kr, tol, "k")
    gq, gk = torch.randn_like(qr), torch.randn_like(kr)
    dq, dk = kc.grads((qo, ko), (q_lin, k_lin), (gq, gk))
    dqr, dkr = kc.grads((qr, kr), (ql, kl), (gq, gk))
    kc.assert_close(dq, dqr, tol, "dq")
    kc.assert_close(dk, dkr, tol, "dk")


def test_rope_general_tables_and_shapes(kc):
    """Both halves of cos/sin are read (any table), cos given as [S, D] or HF's [B, 1, S, D]."""
    torch.manual_seed(2)
    q = torch.randn(1, 3, 4, 8, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 1, 4, 8, device=DEVICE, requires_grad=True)
    cos, sin = torch.randn(4, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE)
    for c, s in ((cos, sin), (cos[None, None], sin[None, None])):
        qo, ko = apply_rope(q * 1, k * 1, c, s)
        qr, kr = rope_reference(q, k, cos, sin)
        kc.assert_close(qo, qr, kc.tol[torch.float32], "q")
        kc.assert_close(ko, kr, kc.tol[torch.float32], "k")
        g = (torch.randn_like(qr), torch.randn_like(kr))
        for a, b in zip(kc.grads((qo, ko), (q, k), g), kc.grads((qr, kr), (q, k), g), strict=True):
            kc.assert_close(a, b, kc.tol[torch.float32], "grad")


def test_rope_keeps_hf_layout_both_ways():
    """HF's transposed views in, outputs and gradients out in the same memory layout: transposed back to
    [B, S, H, D] they are contiguous, so attention reads them where they lie and the projections' backward
    needs no copy."""
    bsz, seq, hq, hk, dim = 2, 5, 4, 2, 16
    cos, sin = _cos_sin(1, seq, dim, torch.float32)
    q_lin = torch.randn(bsz, seq, hq * dim, device=DEVICE, requires_grad=True)
    k_lin = torch.randn(bsz, seq, hk * dim, device=DEVICE, requires_grad=True)
    q = (q_lin * 1).view(bsz, seq, hq, dim).transpose(1, 2)
    k = (k_lin * 1).view(bsz, seq, hk, dim).transpose(1, 2)
    seen = {}
    q.register_hook(lambda g: seen.__setitem__("dq", g.stride()))
    k.register_hook(lambda g: seen.__setitem__("dk", g.stride()))
    qo, ko = apply_rope(q, k, cos, sin, inplace=True)
    assert (qo.stride(), ko.stride()) == (q.stride(), k.stride())
    assert qo.transpose(1, 2).is_contiguous() and ko.transpose(1, 2).is_contiguous()
    (qo.sum() + ko.sum()).backward()
    assert seen == {"dq": q.stride(), "dk": k.stride()}


def test_rope_inplace_rules(kc):
    torch.manual_seed(3)
    cos, sin = _cos_sin(1, 4, 8, torch.float32)
    q0, k0 = torch.randn(1, 2, 4, 8, device=DEVICE), torch.randn(1, 1, 4, 8, device=DEVICE)
    qr, kr = rope_reference(q0, k0, cos, sin)
    # no autograd: overwritten in place
    q, k = q0.clone(), k0.clone()
    qo, ko = apply_rope(q, k, cos, sin, inplace=True)
    assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
    kc.assert_close(q, qr, kc.tol[torch.float32])
    # autograd, not views: in place, marked dirty, gradients still right
    leaf_q = q0.clone().requires_grad_()
    q, k = leaf_q * 1, k0.clone()
    ptr = q.data_ptr()
    qo, ko = apply_rope(q, k, cos, sin, inplace=True)
    assert qo.data_ptr() == ptr
    (dq,) = kc.grads(qo, (leaf_q,), torch.ones_like(qo))
    (dqr,) = kc.grads(rope_reference(leaf_q, k0, cos, sin)[0], (leaf_q,), torch.ones_like(qo))
    kc.assert_close(dq, dqr, kc.tol[torch.float32], "dq")
    # inplace=False never touches the inputs
    q, k = q0.clone(), k0.clone()
    apply_rope(q, k, cos, sin, inplace=False)
    assert torch.equal(q, q0) and torch.equal(k, k0)


def test_rope_falls_back_without_triton(kc, monkeypatch):
    monkeypatch.setenv("FORGE_KERNELS", "off")
    cos, sin = _cos_sin(1, 4, 8, torch.float32)
    q, k = torch.randn(1, 2, 4, 8, device=DEVICE), torch.randn(1, 1, 4, 8, device=DEVICE)
    qo, ko = apply_rope(q, k, cos, sin)
    qr, kr = rope_reference(q, k, cos, sin)
    assert torch.equal(qo, qr) and torch.equal(ko, kr)
