"""`forge data inspect`'s structured result: the examples the data stage builds, as trained and masked text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forge.config import DataConfig
from forge.data.inspect import Span, inspect_examples

CONVERSATION = [
    {"role": "system", "content": "You convert units."},
    {"role": "user", "content": "How many meters are in 2 kilometers?"},
    {"role": "assistant", "content": "Answer: 2000 meters"},
    {"role": "user", "content": "And 3 kilometers?"},
    {"role": "assistant", "content": "Answer: 3000 meters"},
]


def test_system_and_user_text_are_masked_and_answers_with_their_end_of_turn_trained(
    write_jsonl: Callable[..., Path], smol_tokenizer: Any
) -> None:
    path = write_jsonl([{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}])
    examples = inspect_examples(path, smol_tokenizer, DataConfig(path=str(path)), n=1, log=lambda _: None)
    assert len(examples) == 1
    ex = examples[0]
    assert ex.where == f"{path}:1"
    assert ex.spans == [
        Span(
            "<|im_start|>system\nYou convert units.<|im_end|>\n"
            "<|im_start|>user\nHow many meters are in 2 kilometers?<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        Span("Answer: 2000 meters<|im_end|>", True),
        Span("\n<|im_start|>user\nAnd 3 kilometers?<|im_end|>\n<|im_start|>assistant\n", False),
        Span("Answer: 3000 meters<|im_end|>", True),
        Span("\n", False),
    ]
    answer_tokens = sum(
        len(smol_tokenizer(s.text, add_special_tokens=False)["input_ids"]) for s in ex.spans if s.trained
    )
    assert ex.trained_tokens == answer_tokens
    assert ex.tokens == ex.full_tokens == len(smol_tokenizer("".join(s.text for s in ex.spans))["input_ids"])
    assert ex.truncated_at is None and ex.cut_text == "" and not ex.dropped


def test_truncation_shows_where_it_cut_and_what_was_never_seen(
    write_jsonl: Callable[..., Path], smol_tokenizer: Any
) -> None:
    path = write_jsonl([{"messages": CONVERSATION}])
    whole = inspect_examples(path, smol_tokenizer, DataConfig(path=str(path)), log=lambda _: None)[0]
    limit = whole.tokens - 3  # cuts " meters<|im_end|>\n" off the last answer
    cfg = DataConfig(path=str(path), max_seq_len=limit)
    cut = inspect_examples(path, smol_tokenizer, cfg, log=lambda _: None)[0]
    assert (cut.tokens, cut.full_tokens, cut.truncated_at) == (limit, whole.tokens, limit)
    assert cut.cut_text == " meters<|im_end|>\n"
    assert cut.spans[:-1] == whole.spans[:-2] and cut.spans[-1] == Span("Answer: 3000", True)
    assert cut.trained_tokens == whole.trained_tokens - 2


def test_an_example_without_an_answer_is_shown_as_dropped(
    write_jsonl: Callable[..., Path], smol_tokenizer: Any
) -> None:
    path = write_jsonl([{"messages": CONVERSATION[:2]}])
    ex = inspect_examples(path, smol_tokenizer, DataConfig(path=str(path)), log=lambda _: None)[0]
    assert ex.dropped and [s.trained for s in ex.spans] == [False]


def test_the_command_prints_the_counts_and_the_cut(tmp_path: Path, smollm2_hf_dir: Path) -> None:
    """`forge data inspect` as a user runs it: the base stage is made first, then the examples are printed."""
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    config = {"base": {"model": str(smollm2_hf_dir)}, "data": {"path": "chat.jsonl", "max_seq_len": 40}}
    (tmp_path / "forge.yaml").write_text(json.dumps(config))
    forge = str(Path(sys.executable).parent / "forge")
    result = subprocess.run(
        [forge, "data", "inspect", "--n", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs" / "default" / "base" / "manifest.json").is_file()
    assert "chat.jsonl:1: 40 tokens, " in result.stdout and "cut at token 40 of " in result.stdout
    assert "<|im_start|>system\nYou convert units.<|im_end|>" in result.stdout
