"""Fused linear + cross-entropy in chunks of tokens: the full [T, V] logits never exist.

    loss = sum over tokens t with labels[t] != ignore_index of (logsumexp(z_t) - z_t[labels[t]]) / N
    z = softcap * tanh((h W^T) / softcap)   (Gemma 2's final-logit soft-capping; z = h W^T without it)

N, the normalizer, is by default the number of target tokens in this call (a mean). For gradient
accumulation give N = the number of target tokens across the whole accumulated batch (what transformers
calls ``num_items_in_batch``): the micro-batch losses then add up to the exact mean over the batch, and so
do their gradients. N may be a tensor on the GPU: it is read by the kernel, never synced to the host.

The forward walks the tokens in chunks of C rows. For each chunk: logits = h_c W^T (one [C, V] buffer in
the compute dtype), then one Triton program per row makes two passes over the row (online max/sum-exp,
then the gradient), writing dlogits = (softmax(z) - onehot) / N (times dz/dlogit with soft-capping) over
the logits in place, and the row's loss. Then dh_c = dlogits W and, when W is trained, dW += dlogits^T h_c.
The backward only scales the saved dh (and dW) by the incoming scalar gradient. Rows whose label is
ignore_index get zero loss and zero gradient and skip the exponentials.

Labels are the targets already aligned with the hidden states (for a causal LM: shifted, see
`shift_labels`). Logits are upcast to fp32 in the kernel, as transformers' loss does.
"""

from __future__ import annotations

import torch

from ._device import cdiv, compute_dtype, next_pow2, no_autocast, tl, triton, use_triton

MAX_BLOCK_V = 32768  # vocabulary elements per loop step of the row kernel (32 warps -> 32 per thread)

# ----------------------------------------------------------------------------------------- Triton


@triton.jit
def _softcap(x, cap):
    t = 2.0 * tl.sigmoid(2.0 * x / cap) - 1.0  # tanh(x / cap)
    return cap * t, t


@triton.jit
def _ce_rows_kernel(
    LOGITS,
    stride_row,
    LABELS,
    LOSS,
    INV_N,
    n_cols,
    ignore_index,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    label = tl.load(LABELS + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if label == ignore_index:
        for off in range(0, n_cols, BLOCK):
            c = off + cols
            tl.store(ptr + c, tl.zeros([BLOCK], dtype=tl.float32).to(LOGITS.dtype.element_ty), mask=c < n_cols)
        tl.store(LOSS + row, 0.0)
    else:
        # pass 1: running max m and sum d of exp(z - m)
        m = float("-inf")
        d = 0.0
        for off in range(0, n_cols, BLOCK):
            c = off + cols
            z = tl.load(ptr + c, mask=c < n_cols, other=float("-inf")).to(tl.float32)
            if HAS_SOFTCAP:
                z, _ = _softcap(z, softcap)
                z = tl.where(c < n_cols, z, float("-inf"))  # softcap(-inf) is -softcap, not -inf
            m_new = tl.maximum(m, tl.max(z, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        z_label = tl.load(ptr + label).to(tl.float32)
        if HAS_SOFTCAP:
            z_label, _ = _softcap(z_label, softcap)
        inv_n = tl.load(INV_N)
        # pass 2: dlogits = (softmax - onehot) / N (* dz/dx), over the logits
        for off in range(0, n_cols, BLOCK):
            c = off + cols
            mask = c < n_cols
            x = tl.load(ptr + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z, t = _softcap(x, softcap)
            else:
                z = x
            p = tl.exp(z - lse)
            g = tl.where(c == label, p - 1.0, p) * inv_n
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            tl.store(ptr + c, g.to(LOGITS.dtype.element_ty), mask=mask)
        tl.store(LOSS + row, lse - z_label)


def _ce_rows_torch(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss: torch.Tensor,
    inv_n: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
) -> None:
    """What the kernel does, in PyTorch: loss per row; the gradient over `logits`."""
    x = logits.float()
    if softcap:
        t = torch.tanh(x / softcap)
        z = softcap * t
    else:
        z = x
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(z, dim=-1)
    loss.copy_((lse - z.gather(1, safe[:, None]).squeeze(1)) * valid)
    g = torch.exp(z - lse[:, None])
    g[torch.arange(g.shape[0], device=g.device), safe] -= 1.0
    g *= (valid.float() * inv_n)[:, None]
    if softcap:
        g *= 1.0 - t * t
    logits.copy_(g)


def _ce_rows(logits, labels, loss, inv_n, ignore_index, softcap) -> None:
    rows, n_cols = logits.shape
    if not use_triton(logits):
        return _ce_rows_torch(logits, labels, loss, inv_n, ignore_index, softcap)
    block = min(next_pow2(n_cols), MAX_BLOCK_V)
    num_warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    if rows:
        _ce_rows_kernel[(rows,)](
            logits,
            logits.stride(0),
            labels,
            loss,
            inv_n,
            n_cols,
            ignore_index,
            float(softcap) if softcap else 1.0,
            HAS_SOFTCAP=bool(softcap),
            BLOCK=block,
            num_warps=num_warps,
        )


CHUNK_LOGITS_BYTES = 2**28  # a chunk's 16-bit logits may take this much: 1,024 rows of a 128k vocabulary


def default_chunk_size(n_tokens: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: the larger of "one chunk of logits as large as the hidden states"
    (next_pow2(ceil(T / ceil(V / H)))) and the largest power of two whose 16-bit logits fit in
    CHUNK_LOGITS_BYTES (so the two matmuls of a chunk are large enough to run at full speed); at most T."""
    by_hidden = next_pow2(cdiv(n_tokens, cdiv(vocab, hidden)))
    by_bytes = 1 << max(0, (CHUNK_LOGITS_BYTES // (2 * vocab)).bit_length() - 1)
    return max(1, min(n_tokens, max(by_hidden, by_bytes)))


def _inv_normalizer(labels, normalizer, ignore_index, device) -> torch.Tensor:
    if normalizer is None:
        n = (labels != ignore_index).sum().clamp_min(1).float()
    elif torch.is_tensor(normalizer):
        n = normalizer.to(device).float()
    else:  # a number: filled on the device (a host tensor copied over would make the step wait for the GPU)
        return torch.full((1,), 1.0 / float(normalizer), device=device)
    return (1.0 / n).reshape(1)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, normalizer, ignore_index: int, softcap, chunk_size, dtype):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with no_autocast(hidden.device):
            h2 = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
            lab = labels.reshape(-1).to(device=hidden.device, dtype=torch.int64)
            if lab.numel() != h2.shape[0]:
                raise ValueError(f"labels hold {lab.numel()} targets for {h2.shape[0]} hidden states")
            n_tok, hid = h2.shape
            vocab = weight.shape[0]
            w = weight.to(dtype)
            inv_n = _inv_normalizer(lab, normalizer, ignore_index, hidden.device)
            loss_rows = torch.empty(n_tok, dtype=torch.float32, device=hidden.device)
            dh = torch.empty_like(h2) if need_dh else None
            dw = torch.zeros(vocab, hid, dtype=torch.float32, device=hidden.device) if need_dw else None
            chunk = chunk_size or default_chunk_size(n_tok, hid, vocab)
            for start in range(0, n_tok, chunk):
                end = min(start + chunk, n_tok)
                hc = h2[start:end]
                logits = hc @ w.t()  # [c, V] in the compute dtype; becomes dlogits in place
                _ce_rows(logits, lab[start:end], loss_rows[start:end], inv_n, ignore_index, softcap)
                if need_dh:
                    torch.mm(logits, w, out=dh[start:end])
                if need_dw:
                    dw.add_(logits.t() @ hc)
                del logits
            loss = loss_rows.sum() * inv_n.reshape(())
        ctx.save_for_backward(dh, dw)
        ctx.meta = (hidden.shape, hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        shape, hdtype, wdtype = ctx.meta
        gh = gw = None
        if dh is not None:
            gh = (dh * grad_loss.to(dh.dtype)).view(shape).to(hdtype)
        if dw is not None:
            gw = (dw * grad_loss).to(wdtype)
        return gh, gw, None, None, None, None, None, None


# -------------------------------------------------------------------------------------- reference


def cross_entropy_reference(
    hidden, weight, labels, normalizer=None, ignore_index: int = -100, softcap: float | None = None
) -> torch.Tensor:
    """transformers' causal-LM loss on aligned labels: full fp32 logits, sum over targets / N."""
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.to(hidden.dtype).t()).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    lab = labels.reshape(-1).long()
    total = torch.nn.functional.cross_entropy(logits, lab, ignore_index=ignore_index, reduction="sum")
    if normalizer is None:
        normalizer = (lab != ignore_index).sum().clamp_min(1)
    return total / torch.as_tensor(normalizer, device=total.device).float()


# ----------------------------------------------------------------------------------------- public


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Causal-LM targets aligned with the hidden states: labels[..., 1:] padded with ignore_index,
    as transformers' ForCausalLMLoss does."""
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    normalizer: int | float | torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of (hidden @ weight^T) against labels without materializing the logits.

    hidden: [..., H]; weight: [V, H] (the lm_head; trained or frozen); labels: [...] int, aligned with
    hidden (shift first for a causal LM), ignore_index skipped; normalizer: N above (default: the number
    of targets here); softcap: final-logit soft-capping (Gemma 2), None for none; chunk_size: rows per
    chunk (default: `default_chunk_size`). Returns the 0-dim fp32 loss; differentiable in hidden and
    weight. A call with no target at all returns 0 with zero gradients (transformers' mean gives nan).
    """
    return FusedLinearCrossEntropyFunction.apply(
        hidden,
        weight,
        labels,
        normalizer,
        int(ignore_index),
        softcap,
        chunk_size,
        compute_dtype(hidden),
    )
