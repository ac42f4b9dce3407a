"""Deterministic train/eval split by hashing each row: a row's side depends on its content and the seed
only, so editing, adding or removing other rows never moves it (identical rows land on the same side)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any


def row_score(record: Any, seed: int) -> float:
    """A number in [0, 1) fixed by the row's content and the seed."""
    key = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    digest = hashlib.sha256(f"{seed}\n{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def eval_mask(scores: Sequence[float], fraction: float) -> list[bool]:
    """True for rows held out: score below fraction. Training always keeps at least one row (the highest
    score), and with fraction > 0 and two rows or more, eval gets at least one (the lowest score)."""
    held = [s < fraction for s in scores]
    if held and all(held):
        held[max(range(len(scores)), key=scores.__getitem__)] = False
    if fraction > 0 and len(scores) >= 2 and not any(held):
        held[min(range(len(scores)), key=scores.__getitem__)] = True
    return held
