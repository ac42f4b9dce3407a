"""One evaluation, top to bottom: score every GGUF and the HF models on the same tokens, smoke-test every
GGUF's generation, then check the gate.

The unquantized GGUF (the reference) is scored first and its log-probabilities are kept in `workdir`, so
each quant's KL divergence and top-1 agreement are measured against it with one model in memory at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from forge.config import EvalConfig
from forge.data.shards import TokenSplit
from forge.eval.errors import EvalError
from forge.eval.gate import check_gate
from forge.eval.generation import Messages, smoke_test
from forge.eval.perplexity import gguf_perplexity, hf_perplexity
from forge.eval.results import EvalReport, GgufResult
from forge.eval.tokens import EvalSet, select_examples


@dataclass(frozen=True)
class GgufFile:
    """A GGUF to evaluate and its type name (f16, q8_0, q4_k_m, ...), which keys the gate's thresholds."""

    name: str
    path: Path


def evaluate(
    reference: GgufFile,
    quants: list[GgufFile],
    split: TokenSplit,
    conversations: list[Messages],
    cfg: EvalConfig,
    workdir: Path,
    finetuned_hf: Path | None = None,
    base_hf: Path | None = None,
    log: Callable[[str], None] = print,
) -> EvalReport:
    """Score, smoke-test and gate the reference GGUF and its quants (and the HF models when given)."""
    evalset = select_examples(split, cfg.max_eval_tokens)
    if not evalset.sequences:
        raise EvalError(
            "the held-out split has no labelled tokens to score (is data.eval_fraction 0?); "
            "eval needs held-out examples"
        )
    log(f"  scoring {evalset.num_scored} labelled tokens of {len(evalset.sequences)} held-out examples")
    workdir.mkdir(parents=True, exist_ok=True)
    ref_logprobs = workdir / f"reference-{reference.name}.npy"
    try:
        results = [
            _evaluate_gguf(g, g is reference, ref_logprobs, evalset, conversations, cfg, log)
            for g in [reference, *quants]
        ]
    finally:
        ref_logprobs.unlink(missing_ok=True)  # scored positions x vocab floats: large
    finetuned = base = None
    if finetuned_hf is not None:
        finetuned = hf_perplexity(finetuned_hf, evalset, cfg.threads)
        log(f"  merged HF model: perplexity {finetuned.perplexity:.4f}")
    if base_hf is not None:
        base = hf_perplexity(base_hf, evalset, cfg.threads)
        log(f"  base HF model: perplexity {base.perplexity:.4f}")
    report = EvalReport(
        reference=reference.name,
        ggufs=results,
        eval_set={
            "examples": len(evalset.sequences),
            "tokens": evalset.num_tokens,
            "scored_tokens": evalset.num_scored,
            "prompts": len(conversations),
        },
        settings=cfg.model_dump(mode="json"),
        finetuned=finetuned,
        base=base,
    )
    report.gate = check_gate(report, cfg)
    return report


def _evaluate_gguf(
    gguf: GgufFile,
    is_reference: bool,
    ref_logprobs: Path,
    evalset: EvalSet,
    conversations: list[Messages],
    cfg: EvalConfig,
    log: Callable[[str], None],
) -> GgufResult:
    """Perplexity (recording the reference, or compared with it) and the smoke test of one GGUF."""
    ppl = gguf_perplexity(
        gguf.path,
        evalset,
        cfg.threads,
        record=ref_logprobs if is_reference else None,
        against=None if is_reference else ref_logprobs,
    )
    log(f"  {gguf.path.name}: perplexity {ppl.perplexity:.4f} ({ppl.seconds:.0f}s)")
    smoke = smoke_test(gguf.path, conversations, cfg.max_tokens, cfg.repeat_penalty, cfg.threads)
    log(f"  {gguf.path.name}: {smoke.stopped}/{len(smoke.generations)} generations stopped")
    return GgufResult(gguf.name, gguf.path, gguf.path.stat().st_size, ppl, smoke)
