"""Checks on the labels the data stage produced: examples with nothing to train, and a model that never learns
to stop (no EOS / end-of-turn token is ever a label)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from forge.config import DataConfig
from forge.data.shards import Example

LISTED_DROPS = 20  # dropped examples named in stats.json (all are counted)


@dataclass
class Drops:
    """Examples left out because no token carries a label: masked from the start, or cut by max_seq_len."""

    masked: int = 0  # no trained token even before truncation (no assistant turn, or the template renders none)
    cut: int = 0  # trained tokens only beyond data.max_seq_len
    listed: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.masked + self.cut

    def add(self, where: str, why: str) -> None:
        """Count one dropped example; why is 'masked' or 'cut'."""
        if why == "masked":
            self.masked += 1
        else:
            self.cut += 1
        if len(self.listed) < LISTED_DROPS:
            self.listed.append(f"{where}: {'no trained token' if why == 'masked' else 'answer cut off'}")

    def line(self, examples: int, cfg: DataConfig) -> str:
        """One log line: how many of the examples were dropped and why."""
        parts = []
        if self.masked:
            parts.append(f"{self.masked} with every label masked")
        if self.cut:
            parts.append(f"{self.cut} whose trained tokens lie beyond data.max_seq_len={cfg.max_seq_len}")
        return f"dropped {self.total} of {examples} examples ({', '.join(parts)}; first: {self.listed[0]})"

    def nothing_left(self, examples: int, skipped: int, cfg: DataConfig) -> str:
        """The one-line reason the stage stops when no example has a trained token."""
        if examples == 0:
            return f"no usable examples ({skipped} rows skipped)"
        causes = []
        if self.masked:
            causes.append(
                f"{self.masked} of {examples} examples have every label masked: with data.train_on="
                f"{cfg.train_on} only {'assistant turns' if cfg.train_on == 'responses' else 'rendered text'} "
                "are trained, so check that rows have assistant turns with content and that the chat template "
                "renders them"
            )
        if self.cut:
            causes.append(
                f"{self.cut} of {examples} lose every trained token to truncation: raise data.max_seq_len "
                f"(now {cfg.max_seq_len})"
            )
        skipped_note = f"; {skipped} rows skipped" if skipped else ""
        return f"no example has a trained token: {'; '.join(causes)}{skipped_note}"


def stop_token_ids(tokenizer: Any) -> dict[int, str]:
    """The tokens generation stops on: EOS and the end-of-turn markers the GGUF converter records (id -> text)."""
    from forge.converters.tokenizer import END_OF_TURN_TOKENS

    ids: dict[int, str] = {}
    if tokenizer.eos_token_id is not None:
        ids[int(tokenizer.eos_token_id)] = str(tokenizer.eos_token)
    for text in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(text)
        known = isinstance(token_id, int) and token_id >= 0 and token_id != tokenizer.unk_token_id
        if known and tokenizer.convert_ids_to_tokens(token_id) == text:
            ids[token_id] = text
    return ids


def count_labels(example: Example, ids: Iterable[int]) -> int:
    """How many of the example's labels are one of ids."""
    wanted = set(ids)
    return sum(1 for label in example.labels if label in wanted)


def never_stops_warning(stops: dict[int, str]) -> str:
    """The warning when no stop token is ever a label."""
    names = ", ".join(sorted(set(stops.values()))) or "none (the tokenizer has no EOS token)"
    return (
        f"no EOS / end-of-turn token is ever a label (stop tokens: {names}): the model never learns to stop; "
        "make the chat template close assistant turns with one of them"
    )
