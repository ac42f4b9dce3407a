"""Smoke-test prompts: eval.prompts as user turns, or the held-out rows up to their first answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forge.eval import EvalError
from forge.eval.prompts import conversations_from_prompts, heldout_conversations


def _write(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def test_config_prompts_are_single_user_turns() -> None:
    assert conversations_from_prompts(["Hi", "Name a colour."]) == [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Name a colour."}],
    ]


def test_heldout_rows_stop_before_the_first_answer(tmp_path: Path) -> None:
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "2 m in cm?"}
    answer = {"role": "assistant", "content": "200 cm"}
    rows = [
        {"messages": [system, user, answer, {"role": "user", "content": "and 3 m?"}, answer]},
        {"messages": [answer]},  # no user turn before the answer: nothing to ask
        {"text": "Once upon a time\nthere was a model."},
        {"messages": [user, answer]},
    ]
    path = _write(tmp_path / "eval.jsonl", rows)
    assert heldout_conversations(path, 10) == [
        [system, user],
        [{"role": "user", "content": "Once upon a time"}],
        [user],
    ]
    assert heldout_conversations(path, 1) == [[system, user]]


def test_a_bad_line_is_named_with_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "eval.jsonl", [{"text": "fine"}, "{not json"])
    with pytest.raises(EvalError, match=r"eval\.jsonl:2: not valid JSON"):
        heldout_conversations(path, 5)


def test_a_missing_file_says_which_stage_writes_it(tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="the data stage writes eval.jsonl"):
        heldout_conversations(tmp_path / "eval.jsonl", 5)


def test_the_data_stage_rows_give_user_turns(heldout: Path) -> None:
    conversations = heldout_conversations(heldout / "eval.jsonl", 3)
    assert len(conversations) == 3
    assert all(c[-1]["role"] == "user" and c[-1]["content"] for c in conversations)
