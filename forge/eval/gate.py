"""The quality gate: thresholds from EvalConfig checked against an EvalReport, and the failure table."""

from __future__ import annotations

import math

from forge.config import EvalConfig
from forge.eval.results import EvalReport, Failure, Gate


def check_gate(report: EvalReport, cfg: EvalConfig) -> Gate:
    """Every failed check: non-finite or too-high perplexity, unquantized GGUF far from HF, bad stops."""
    failures: list[Failure] = []
    ref = report.gguf(report.reference)
    ref_ppl = ref.perplexity.perplexity
    for g in report.ggufs:
        ppl = g.perplexity.perplexity
        if not math.isfinite(ppl):
            failures.append(Failure(g.path.name, "perplexity", f"perplexity is not finite ({ppl})"))
        elif g.name in cfg.max_ppl_increase and math.isfinite(ref_ppl):
            increase, limit = ppl / ref_ppl - 1, cfg.max_ppl_increase[g.name]
            if increase > limit:
                failures.append(
                    Failure(
                        g.path.name,
                        "perplexity",
                        f"perplexity {ppl:.4g} is {increase:+.2%} over {report.reference} ({ref_ppl:.4g}); "
                        f"eval.max_ppl_increase.{g.name} allows {limit:+.2%}",
                    )
                )
        failures += [Failure(g.path.name, "vocabulary", p) for p in g.smoke.problems]
        for gen in g.smoke.generations:
            where = f"prompt {gen.prompt[:40]!r}"
            failures += [Failure(g.path.name, "generation", f"{where}: {p}") for p in gen.problems]
    if report.finetuned is not None and math.isfinite(ref_ppl):
        hf_ppl = report.finetuned.perplexity
        gap = ref_ppl / hf_ppl - 1
        if not abs(gap) <= cfg.max_gguf_hf_gap:
            failures.append(
                Failure(
                    ref.path.name,
                    "conversion",
                    f"perplexity {ref_ppl:.4g} differs {gap:+.2%} from the merged HF model's ({hf_ppl:.4g}); "
                    f"eval.max_gguf_hf_gap allows ±{cfg.max_gguf_hf_gap:.2%}: "
                    "the conversion changed the model",
                )
            )
    return Gate(failures)


def failure_table(gate: Gate) -> str:
    """The failed checks as a plain-text table (model, check, why)."""
    rows = [("model", "check", "why")] + [(f.model, f.check, f.message) for f in gate.failures]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"  {m:<{widths[0]}}  {c:<{widths[1]}}  {w}" for m, c, w in rows)
