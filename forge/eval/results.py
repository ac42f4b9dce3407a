"""What an evaluation found: per-GGUF results, the HF models' scores and the gate, as JSON-able data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forge.eval.generation import SmokeTest
from forge.eval.perplexity import Perplexity


@dataclass
class GgufResult:
    """One GGUF: its type name (f16, q8_0, ...), file, size, perplexity scores and smoke test."""

    name: str
    path: Path
    size: int
    perplexity: Perplexity
    smoke: SmokeTest

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.path.name,
            "size": self.size,
            **self.perplexity.to_dict(),
            "smoke": self.smoke.to_dict(),
        }


@dataclass
class Failure:
    """A failed gate check: which model, which check, and a sentence saying why."""

    model: str
    check: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"model": self.model, "check": self.check, "message": self.message}


@dataclass
class Gate:
    failures: list[Failure] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "failures": [f.to_dict() for f in self.failures]}


@dataclass
class EvalReport:
    """Everything the report shows; `reference` names the unquantized GGUF the quants are compared with."""

    reference: str
    ggufs: list[GgufResult]
    eval_set: dict[str, Any]
    settings: dict[str, Any]
    finetuned: Perplexity | None = None
    base: Perplexity | None = None
    gate: Gate = field(default_factory=Gate)

    def gguf(self, name: str) -> GgufResult:
        return next(g for g in self.ggufs if g.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "eval_set": self.eval_set,
            "settings": self.settings,
            "hf": {
                "finetuned": self.finetuned.to_dict() if self.finetuned else None,
                "base": self.base.to_dict() if self.base else None,
            },
            "ggufs": [g.to_dict() for g in self.ggufs],
            "gate": self.gate.to_dict(),
        }
