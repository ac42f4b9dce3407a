"""The eval stage: every GGUF and the merged model scored on the held-out split, smoke-tested, and gated.

Writes report.md, report.json and chart.png. A failed gate fails the stage with a table of why (the
report is kept in the work folder to read) unless eval.gate is false.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from forge.data.shards import load_split
from forge.eval import EvalError, EvalReport, GateFailed, GgufFile, evaluate, failure_table, write_report
from forge.eval.prompts import conversations_from_prompts, heldout_conversations
from forge.pipeline import Stage, StageContext


def gguf_name(path: Path) -> str:
    """The type name in a `model-<type>.gguf` file name (f16, q8_0, q4_k_m, ...)."""
    return path.stem.removeprefix("model-")


def reference_gguf(gguf_dir: Path) -> GgufFile:
    """The gguf stage's one unquantized `model-<dtype>.gguf`."""
    found = sorted(gguf_dir.glob("model-*.gguf"))
    if len(found) != 1:
        raise EvalError(f"{gguf_dir}: expected one model-<dtype>.gguf, found {len(found)}")
    return GgufFile(gguf_name(found[0]), found[0])


def quantized_ggufs(quantize_dir: Path) -> list[GgufFile]:
    """The quantize stage's files, in the order quantize.json lists them."""
    listing = quantize_dir / "quantize.json"
    try:
        rows = json.loads(listing.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvalError(f"{listing}: cannot read the list of quantized files ({exc})") from exc
    return [GgufFile(gguf_name(Path(row["file"])), quantize_dir / row["file"]) for row in rows]


def summary_line(report: EvalReport, enforced: bool) -> str:
    """gate verdict, reference vs HF perplexity, each quant's change, stops, and the fine-tune effect."""
    ref = report.gguf(report.reference).perplexity.perplexity
    verdict = "passed" if report.gate.passed else "FAILED" + ("" if enforced else " (not enforced)")
    parts = [f"gate {verdict}", f"{report.reference} ppl {ref:.3f}"]
    if report.finetuned is not None:
        parts[-1] += f" (HF {report.finetuned.perplexity:.3f})"
    quants = [g for g in report.ggufs if g.name != report.reference]
    parts += [f"{g.name} {g.perplexity.perplexity / ref - 1:+.1%}" for g in quants]
    stopped = sum(g.smoke.stopped for g in report.ggufs)
    total = sum(len(g.smoke.generations) for g in report.ggufs)
    parts.append(f"{stopped}/{total} generations stopped")
    if report.base is not None and report.finetuned is not None:
        parts.append(f"loss {report.base.mean_nll:.3f} → {report.finetuned.mean_nll:.3f} vs base")
    return ", ".join(parts)


class EvalStage(Stage):
    name = "eval"
    version = 1
    needs = ("base", "data", "merge", "quantize", "gguf")
    config_keys = ("eval",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg = ctx.config.eval
        data = ctx.inputs["data"]
        if cfg.prompts:
            conversations = conversations_from_prompts(cfg.prompts)
        else:
            conversations = heldout_conversations(data / "eval.jsonl", cfg.num_prompts)
        report = evaluate(
            reference_gguf(ctx.inputs["gguf"]),
            quantized_ggufs(ctx.inputs["quantize"]),
            load_split(data / "eval.safetensors"),
            conversations,
            cfg,
            ctx.work,
            finetuned_hf=ctx.inputs["merge"] / "model",
            base_hf=ctx.inputs["base"] / "model",
            log=ctx.log,
        )
        write_report(report, ctx.out)
        if cfg.gate and not report.gate.passed:
            kept = ctx.work / "report"
            write_report(report, kept)
            raise GateFailed(
                f"eval gate failed ({len(report.gate.failures)} checks; report: {kept / 'report.md'}; "
                "set eval.gate=false to continue anyway):\n" + failure_table(report.gate)
            )
        return {
            "line": summary_line(report, cfg.gate),
            "gate": "passed" if report.gate.passed else "failed",
            "failures": [f.to_dict() for f in report.gate.failures],
            "perplexity": {g.name: _finite(g.perplexity.perplexity) for g in report.ggufs},
            "hf_perplexity": _finite(report.finetuned.perplexity) if report.finetuned else None,
        }


def _finite(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None
