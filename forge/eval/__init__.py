"""forge.eval: perplexity, KL and top-1 of GGUFs vs the 16-bit model, generation smoke test, gate, report."""

from forge.eval.errors import EvalError, GateFailed
from forge.eval.evaluate import GgufFile, evaluate
from forge.eval.gate import check_gate, failure_table
from forge.eval.report import write_report
from forge.eval.results import EvalReport

__all__ = [
    "EvalError",
    "EvalReport",
    "GateFailed",
    "GgufFile",
    "check_gate",
    "evaluate",
    "failure_table",
    "write_report",
]
