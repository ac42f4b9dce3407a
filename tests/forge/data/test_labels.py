"""The data stage's label checks, through `prepare` with SmolLM2's tokenizer: examples with nothing to train
are dropped and counted, a set with nothing to train fails with the cause, and a set whose answers never end
on a stop token is warned about."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from forge.config import DataConfig
from forge.data.build import prepare, summary_line
from forge.data.errors import DataError

QA = [("Convert 2 meters to centimeters.", "Answer: 200 centimeters"), ("What is 2 hours in minutes?", "Answer: 120")]
# A template written for prompts only: it leaves the assistant's messages out, so no answer is ever rendered.
PROMPTS_ONLY = (
    "{% for m in messages %}{% if m.role != 'assistant' %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endif %}{% endfor %}"
)
# Closes assistant turns with a plain-text marker instead of an end-of-turn token.
TEXT_MARKER = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }} [END]\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def conversations(pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


def tokenizer_with(hf_dir: Path, template: str | None) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def test_a_set_whose_assistant_turns_are_all_masked_fails_with_the_cause(
    write_jsonl: Callable[..., Path], smollm2_hf_dir: Path
) -> None:
    path = write_jsonl(conversations(QA))
    with pytest.raises(DataError) as caught:
        prepare(path, tokenizer_with(smollm2_hf_dir, PROMPTS_ONLY), DataConfig(path=str(path)), lambda _: None)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: no example has a trained token: 2 of 2 examples have every label masked")
    assert "data.train_on=responses" in message and "chat template renders them" in message


def test_examples_with_nothing_to_train_are_dropped_counted_and_named(
    write_jsonl: Callable[..., Path], smol_tokenizer: Any
) -> None:
    rows = conversations(QA) + [{"messages": [{"role": "user", "content": "Only a question"}]}]
    path = write_jsonl(rows)
    logs: list[str] = []
    stats = prepare(path, smol_tokenizer, DataConfig(path=str(path), eval_fraction=0.0), logs.append).stats
    assert (stats["examples"], stats["dropped"], stats["dropped_masked"], stats["dropped_cut"]) == (2, 1, 1, 0)
    assert stats["dropped_rows"] == [f"{path}:3: no trained token"]
    assert f"dropped 1 of 3 examples (1 with every label masked; first: {path}:3: no trained token)" in logs


def test_answers_cut_off_by_max_seq_len_name_the_setting(
    write_jsonl: Callable[..., Path], smol_tokenizer: Any
) -> None:
    path = write_jsonl(conversations([("Convert these numbers please. " * 30, "Answer: 1")]))
    with pytest.raises(DataError, match=r"1 of 1 lose every trained token to truncation: raise data.max_seq_len"):
        prepare(path, smol_tokenizer, DataConfig(path=str(path), max_seq_len=64), lambda _: None)


def test_no_stop_token_among_the_labels_is_warned_and_recorded(
    write_jsonl: Callable[..., Path], smollm2_hf_dir: Path, smol_tokenizer: Any
) -> None:
    path = write_jsonl(conversations(QA))
    cfg = DataConfig(path=str(path), eval_fraction=0.0)
    logs: list[str] = []
    stats = prepare(path, tokenizer_with(smollm2_hf_dir, TEXT_MARKER), cfg, logs.append).stats
    assert stats["examples"] == 2 and stats["stop_token_labels"] == 0
    assert len(stats["warnings"]) == 1 and "never learns to stop" in stats["warnings"][0]
    assert "<|im_end|>" in stats["warnings"][0]
    assert f"warning: {stats['warnings'][0]}" in logs
    assert summary_line(stats).endswith(f"; warning: {stats['warnings'][0]}")

    good = prepare(path, smol_tokenizer, cfg, lambda _: None).stats
    assert good["stop_token_labels"] == 2 and good["warnings"] == []  # each answer's <|im_end|>
