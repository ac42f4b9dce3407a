"""The eval stage's error types: bad inputs, and a failed quality gate."""

from __future__ import annotations


class EvalError(ValueError):
    """An evaluation input problem (missing file, empty held-out split, mismatched vocabularies)."""


class GateFailed(EvalError):
    """The quality gate failed; the message is a table of the failed checks."""
