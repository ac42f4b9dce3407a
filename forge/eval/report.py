"""The report files: report.json (all numbers), report.md (tables per GGUF) and chart.png."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from forge.eval.results import EvalReport, GgufResult

CHART = "chart.png"
SHOWN_CHARS = 160  # generated text shown per prompt in report.md


def write_report(report: EvalReport, out: Path) -> list[Path]:
    """Write report.json, report.md and chart.png into out (each under a temporary name, then renamed)."""
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _atomic_text(out / "report.json", json.dumps(report.to_dict(), indent=2, ensure_ascii=False)),
        _atomic_text(out / "report.md", render_markdown(report)),
    ]
    partial = out / f".{CHART}.partial"
    write_chart(report, partial)
    os.replace(partial, out / CHART)
    return [*written, out / CHART]


def _atomic_text(path: Path, text: str) -> Path:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
    return path


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, fmt)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _cell(text: str) -> str:
    """Text made safe for one markdown table cell."""
    return text.replace("|", "\\|").replace("\n", "⏎")


def render_markdown(report: EvalReport) -> str:
    """The report as markdown: gate verdict, fine-tune effect, a summary table, then one section per GGUF."""
    ref = report.gguf(report.reference).perplexity.perplexity
    es = report.eval_set
    lines = [
        "# Evaluation report",
        "",
        f"**Gate: {'passed' if report.gate.passed else 'FAILED'}**",
        "",
    ]
    if report.gate.failures:
        lines += ["| model | check | why |", "|---|---|---|"]
        lines += [f"| {f.model} | {f.check} | {_cell(f.message)} |" for f in report.gate.failures]
        lines.append("")
    lines += [
        f"Scored on {es['scored_tokens']} labelled tokens of {es['examples']} held-out examples "
        f"({es['tokens']} tokens evaluated); the same tokens for every model.",
        "",
    ]
    if report.finetuned is not None:
        lines += ["## Fine-tune effect (PyTorch, held-out loss)", ""]
        lines += ["| model | loss | perplexity |", "|---|---|---|"]
        for label, p in (("base", report.base), ("fine-tuned (merged)", report.finetuned)):
            if p is not None:
                lines.append(f"| {label} | {_num(p.mean_nll, '.4f')} | {_num(p.perplexity, '.4f')} |")
        if report.base is not None:
            delta = report.finetuned.mean_nll - report.base.mean_nll
            lines += ["", f"Loss change from fine-tuning: {_num(delta, '+.4f')} nats per token."]
        lines.append("")
    lines += [
        "## GGUF files",
        "",
        "| GGUF | size | perplexity | vs " + report.reference + " | KL | top-1 | stops |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in report.ggufs:
        p = g.perplexity
        vs = p.perplexity / ref - 1 if math.isfinite(ref) and ref > 0 else None
        lines.append(
            f"| {g.path.name} | {_mib(g.size)} | {_num(p.perplexity, '.4f')} | {_num(vs, '+.2%')} "
            f"| {_num(p.kl, '.5f')} | {_num(p.top1, '.2%')} | {g.smoke.stopped}/{len(g.smoke.generations)} |"
        )
    lines += ["", f"![perplexity and size per GGUF]({CHART})", ""]
    for g in report.ggufs:
        lines += _gguf_section(g)
    lines += ["## Settings", "", "```json", json.dumps(report.settings, indent=2), "```", ""]
    return "\n".join(lines)


def _gguf_section(g: GgufResult) -> list[str]:
    p, s = g.perplexity, g.smoke
    lines = [
        f"## {g.path.name}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| size | {_mib(g.size)} |",
        f"| perplexity | {_num(p.perplexity, '.4f')} |",
        f"| mean KL vs reference (99th pct) | {_num(p.kl, '.5f')} ({_num(p.kl_p99, '.5f')}) |",
        f"| top-1 agreement | {_num(p.top1, '.2%')} |",
        f"| load time | {_num(p.load_seconds, '.2f')} s |",
        f"| prompt tokens/s | {_num(s.prompt_tokens_per_s, '.1f')} |",
        f"| generation tokens/s | {_num(s.gen_tokens_per_s, '.1f')} |",
        "",
    ]
    lines += [f"- problem: {_cell(problem)}" for problem in s.problems]
    if s.generations:
        lines += ["| prompt | tokens | stopped by | verdict | output |", "|---|---|---|---|---|"]
        for gen in s.generations:
            verdict = "ok" if not gen.problems else "; ".join(gen.problems)
            lines.append(
                f"| {_cell(gen.prompt[:60])} | {gen.tokens} | {_cell(gen.stopped_by or '–')} "
                f"| {_cell(verdict)} | {_cell(gen.text[:SHOWN_CHARS])} |"
            )
    lines.append("")
    return lines


def write_chart(report: EvalReport, path: Path) -> None:
    """Two bar charts side by side: perplexity per GGUF (HF model as a line) and file size per GGUF."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    names = [g.name for g in report.ggufs]
    ppl = [g.perplexity.perplexity if math.isfinite(g.perplexity.perplexity) else 0.0 for g in report.ggufs]
    sizes = [g.size / 2**20 for g in report.ggufs]
    fig = Figure(figsize=(9, 3.6), dpi=100)
    ax_ppl, ax_size = fig.subplots(1, 2)
    ax_ppl.bar(names, ppl, color="#4878a8")
    if report.finetuned is not None and math.isfinite(report.finetuned.perplexity):
        ax_ppl.axhline(report.finetuned.perplexity, color="#c44e52", linestyle="--", label="merged HF")
        ax_ppl.legend(loc="upper left")
    low = min((v for v in ppl if v > 0), default=1.0)
    ax_ppl.set_ylim(low * 0.95, max(ppl + [low]) * 1.02)
    ax_ppl.set_title("held-out perplexity")
    ax_size.bar(names, sizes, color="#6a9f58")
    ax_size.set_title("file size (MiB)")
    for ax, values, fmt in ((ax_ppl, ppl, "{:.3f}"), (ax_size, sizes, "{:.0f}")):
        for x, v in enumerate(values):
            ax.annotate(fmt.format(v), (x, v), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
