"""The degenerate-output check: a block of tokens repeated back to back.

A generation is degenerate when some block of 1 to MAX_PERIOD tokens occurs at least MIN_REPEATS times in
a row and the run covers at least MIN_SPAN tokens ("la Femme, la Femme, la Femme, ...", a line printed
over and over, sixteen newlines). Lists and tables repeat a few tokens now and then but not four blocks
back to back over sixteen tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MAX_PERIOD = 32
MIN_REPEATS = 4
MIN_SPAN = 16


@dataclass(frozen=True)
class Loop:
    """A repeated run: where it starts, the block length and how many times the block occurs."""

    start: int
    period: int
    repeats: int


def find_loop(tokens: Sequence[int]) -> Loop | None:
    """The longest run of a block repeated back to back that makes the output degenerate, if any."""
    best: Loop | None = None
    n = len(tokens)
    for period in range(1, min(MAX_PERIOD, n // MIN_REPEATS) + 1):
        run = 0  # consecutive positions i with tokens[i] == tokens[i - period]
        for i in range(period, n + 1):
            if i < n and tokens[i] == tokens[i - period]:
                run += 1
                continue
            span = run + period
            repeats = span // period
            longer = best is None or span > best.period * best.repeats
            if repeats >= MIN_REPEATS and span >= MIN_SPAN and longer:
                best = Loop(start=i - span, period=period, repeats=repeats)
            run = 0
    return best
