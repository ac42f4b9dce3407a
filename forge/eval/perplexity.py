"""Perplexity of GGUFs (llama.cpp) and HF folders (PyTorch) on one EvalSet, and KL against a reference GGUF.

The reference GGUF's log-probabilities at the scored positions are kept in a .npy file (memory-mapped,
scored positions x vocab, float32) so that each quant is compared with it while only one model is loaded.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forge.eval.errors import EvalError
from forge.eval.llama import default_threads, open_gguf
from forge.eval.metrics import Accumulator, log_softmax
from forge.eval.tokens import EvalSet
from forge.torch_threads import torch_threads


@dataclass
class Perplexity:
    """Scores of one model on the EvalSet; kl/top1 only when compared with a reference."""

    perplexity: float
    mean_nll: float
    scored_tokens: int
    seconds: float
    load_seconds: float
    kl: float | None = None
    kl_p99: float | None = None
    top1: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The scores as JSON-able values (a non-finite number becomes null)."""
        return {k: _json_number(v) for k, v in asdict(self).items()}


def _json_number(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _result(acc: Accumulator, seconds: float, load_seconds: float) -> Perplexity:
    return Perplexity(
        perplexity=acc.perplexity,
        mean_nll=acc.mean_nll,
        scored_tokens=acc.count,
        seconds=round(seconds, 3),
        load_seconds=round(load_seconds, 3),
        kl=acc.mean_kl,
        kl_p99=acc.kl_p99,
        top1=acc.top1,
    )


def gguf_perplexity(
    path: Path,
    evalset: EvalSet,
    threads: int | None = None,
    record: Path | None = None,
    against: Path | None = None,
) -> Perplexity:
    """Perplexity of the GGUF at path through llama.cpp.

    record: write this model's log-probabilities at the scored positions to that .npy file (the reference).
    against: read a reference written by `record` and add mean KL(reference || this) and top-1 agreement.
    """
    started = time.perf_counter()
    with open_gguf(path, n_ctx=max(evalset.longest, 8), threads=threads, logits_all=True) as (llm, load_s):
        vocab = llm.n_vocab()
        shape = (evalset.num_scored, vocab)
        ref = np.load(against, mmap_mode="r") if against is not None else None
        if ref is not None and ref.shape != shape:
            raise EvalError(
                f"{path}: its vocabulary ({vocab} tokens) or the eval tokens differ from the reference "
                f"{against} ({ref.shape[1]} tokens): KL divergence needs the same vocabulary"
            )
        out = np.lib.format.open_memmap(record, mode="w+", dtype=np.float32, shape=shape) if record else None
        acc = Accumulator()
        row = 0
        for i, tokens in enumerate(evalset.sequences):
            llm.reset()
            llm.eval(tokens.tolist())
            logprobs = log_softmax(llm.scores[evalset.scored[i]])
            rows = slice(row, row + len(logprobs))
            acc.add(logprobs, evalset.targets(i), None if ref is None else np.asarray(ref[rows]))
            if out is not None:
                out[rows] = logprobs
            row += len(logprobs)
        if out is not None:
            out.flush()
            del out
    return _result(acc, time.perf_counter() - started, load_s)


def hf_perplexity(hf_dir: Path, evalset: EvalSet, threads: int | None = None) -> Perplexity:
    """Perplexity of the HF model folder through PyTorch: float32 on CPU, its own dtype on CUDA."""
    import torch
    from transformers import AutoModelForCausalLM

    if not (Path(hf_dir) / "config.json").is_file():
        raise EvalError(f"{hf_dir}: not an HF model folder (no config.json)")
    cuda = torch.cuda.is_available()
    started = time.perf_counter()
    with torch_threads(threads or default_threads()):
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype="auto" if cuda else torch.float32)
        model.to("cuda" if cuda else "cpu").eval()
        load_s = time.perf_counter() - started
        acc = Accumulator()
        with torch.inference_mode():
            for i, tokens in enumerate(evalset.sequences):
                ids = torch.from_numpy(tokens).to(model.device).unsqueeze(0)
                logits = model(input_ids=ids).logits[0, torch.from_numpy(evalset.scored[i]).to(model.device)]
                logprobs = torch.log_softmax(logits.double(), dim=-1).cpu().numpy()
                acc.add(logprobs, evalset.targets(i))
    return _result(acc, time.perf_counter() - started, load_s)
