"""Fused linear + cross-entropy against full-logit F.cross_entropy: loss, d_hidden, d_weight; ignore_index,
soft-capping, chunking, and exact gradient accumulation with a caller-given normalizer."""

import pytest
import torch
from forge.kernels import cross_entropy_reference, fused_linear_cross_entropy, shift_labels
from forge.kernels.cross_entropy import default_chunk_size

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

HID, VOCAB = 32, 300  # 300: the row kernel's last vocabulary block is ragged


def _data(bsz=2, seq=9, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    h = torch.randn(bsz, seq, HID, device=DEVICE).to(dtype).requires_grad_()
    w = (torch.randn(VOCAB, HID, device=DEVICE) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (bsz, seq), device=DEVICE)
    labels[0, :4] = -100  # a masked prompt
    labels[1, -1] = -100
    return h, w, labels


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv("FORGE_KERNELS", "off")
    return request.param


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("chunk_size", [None, 4], ids=["default-chunks", "chunks-of-4"])
def test_matches_reference(kc, softcap, chunk_size, backend):
    h, w, labels = _data()
    loss = fused_linear_cross_entropy(h, w, labels, softcap=softcap, chunk_size=chunk_size)
    ref = cross_entropy_reference(h, w, labels, softcap=softcap)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    kc.assert_close(loss, ref, kc.tol[torch.float32], "loss")
    g = torch.tensor(0.7, device=DEVICE)  # a non-unit upstream gradient
    for a, b, name in zip(kc.grads(loss, (h, w), g), kc.grads(ref, (h, w), g), ("d_hidden", "d_weight"), strict=True):
        kc.assert_close(a, b, kc.tol[torch.float32], name)


def test_gradient_accumulation_is_exact(kc, backend):
    """Two micro-batches with normalizer = targets in both: losses and gradients add up to the big batch's."""
    h, w, labels = _data(bsz=4, seq=6, seed=1)
    labels[2:, :5] = -100  # the micro-batches hold very different numbers of targets
    n_total = (labels != -100).sum()
    full = cross_entropy_reference(h, w, labels)
    g_full = kc.grads(full, (h, w), torch.tensor(1.0, device=DEVICE))
    total = 0.0
    g_acc = [torch.zeros_like(h), torch.zeros_like(w)]
    for part in (slice(0, 2), slice(2, 4)):
        hp = h.detach()[part].clone().requires_grad_()
        loss = fused_linear_cross_entropy(hp, w, labels[part], normalizer=n_total)
        dh, dw = kc.grads(loss, (hp, w), torch.tensor(1.0, device=DEVICE))
        g_acc[0][part] += dh
        g_acc[1] += dw
        total = total + loss
    kc.assert_close(total, full, kc.tol[torch.float32], "accumulated loss")
    kc.assert_close(g_acc[0], g_full[0], kc.tol[torch.float32], "accumulated d_hidden")
    kc.assert_close(g_acc[1], g_full[1], kc.tol[torch.float32], "accumulated d_weight")


def test_ignored_rows_and_frozen_weight(kc):
    h, w, labels = _data(seed=2)
    w = w.detach()  # a frozen lm_head: no d_weight is computed
    labels[1] = -100
    loss = fused_linear_cross_entropy(h, w, labels, normalizer=17)
    ref = cross_entropy_reference(h, w, labels, normalizer=17)
    kc.assert_close(loss, ref, kc.tol[torch.float32], "loss")
    (dh,) = kc.grads(loss, (h,), torch.tensor(1.0, device=DEVICE))
    (dhr,) = kc.grads(ref, (h,), torch.tensor(1.0, device=DEVICE))
    kc.assert_close(dh, dhr, kc.tol[torch.float32], "d_hidden")
    assert torch.all(dh[1] == 0)


def test_all_ignored_gives_zero(kc):
    h, w, labels = _data(seed=3)
    loss = fused_linear_cross_entropy(h, w, torch.full_like(labels, -100))
    assert loss.item() == 0.0
    dh, dw = kc.grads(loss, (h, w), torch.tensor(1.0, device=DEVICE))
    assert torch.all(dh == 0) and torch.all(dw == 0)


def test_bf16(kc):
    h, w, labels = _data(dtype=torch.bfloat16, seed=4)
    loss = fused_linear_cross_entropy(h, w, labels, chunk_size=8)
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = cross_entropy_reference(h32, w32, labels)
    kc.assert_close(loss, ref, kc.tol[torch.bfloat16], "loss")
    g = torch.tensor(1.0, device=DEVICE)
    for a, b, name in zip(
        kc.grads(loss, (h, w), g), kc.grads(ref, (h32, w32), g), ("d_hidden", "d_weight"), strict=True
    ):
        assert a.dtype == torch.bfloat16
        kc.assert_close(a, b, kc.tol[torch.bfloat16], name)


def test_shift_labels_and_chunk_rule(kc):
    labels = torch.tensor([[1, 2, 3, 4]])
    assert shift_labels(labels).tolist() == [[2, 3, 4, -100]]
    assert default_chunk_size(16384, 4096, 128256) == 1024  # 1,024 rows x 128k vocabulary = 256 MiB
    assert default_chunk_size(4096, 4096, 128256) == 1024
    assert default_chunk_size(2**20, 4096, 128256) == 32768  # the hidden-size rule takes over for long batches
    assert default_chunk_size(5, 64, 100) == 5
    assert default_chunk_size(1, 64, 100000) == 1
