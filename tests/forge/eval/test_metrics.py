"""NLL, perplexity, KL divergence and top-1 agreement against PyTorch's own functions."""

from __future__ import annotations

import math

import numpy as np
import torch

from forge.eval.metrics import Accumulator, log_softmax


def test_scores_match_torch_cross_entropy_and_kl_div() -> None:
    gen = torch.Generator().manual_seed(0)
    ref_logits = torch.randn(50, 300, generator=gen, dtype=torch.float64) * 3
    logits = ref_logits + 0.3 * torch.randn(50, 300, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 300, (50,), generator=gen)
    acc = Accumulator()
    ref = log_softmax(ref_logits.numpy())
    # in two chunks, as examples arrive one at a time
    acc.add(log_softmax(logits[:20].numpy()), targets[:20].numpy(), ref[:20])
    acc.add(log_softmax(logits[20:].numpy()), targets[20:].numpy(), ref[20:])

    nll = torch.nn.functional.cross_entropy(logits, targets).item()
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(logits, -1),
        torch.log_softmax(ref_logits, -1),
        log_target=True,
        reduction="batchmean",
    ).item()
    top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).double().mean().item()
    assert math.isclose(acc.mean_nll, nll, rel_tol=1e-9)
    assert math.isclose(acc.perplexity, math.exp(nll), rel_tol=1e-9)
    assert math.isclose(acc.mean_kl, kl, rel_tol=1e-9)
    assert acc.top1 == top1
    assert 0 < acc.top1 < 1 and acc.kl_p99 > acc.mean_kl


def test_a_model_against_itself_has_zero_kl_and_full_agreement() -> None:
    logprobs = log_softmax(np.random.default_rng(0).normal(size=(8, 40)))
    acc = Accumulator()
    acc.add(logprobs, np.arange(8), logprobs)
    assert acc.mean_kl == 0.0 and acc.top1 == 1.0


def test_nothing_scored_is_nan_not_a_number_that_looks_fine() -> None:
    acc = Accumulator()
    assert math.isnan(acc.perplexity) and acc.mean_kl is None and acc.top1 is None
