"""The smoke test's conversations: eval.prompts as single user turns, or the held-out split's prompts."""

from __future__ import annotations

import json
from pathlib import Path

from forge.eval.errors import EvalError
from forge.eval.generation import Messages

TEXT_PROMPT_CHARS = 200  # a plain-text example becomes a user turn of its first line, cut to this length


def conversations_from_prompts(prompts: list[str]) -> list[Messages]:
    """Each prompt as a one-message conversation from the user."""
    return [[{"role": "user", "content": p}] for p in prompts]


def heldout_conversations(eval_jsonl: Path, limit: int) -> list[Messages]:
    """The first `limit` held-out rows as prompts: each conversation up to its first assistant turn.

    A plain-text row (data.format=text) becomes one user turn holding the first line of its text.
    """
    if not eval_jsonl.is_file():
        raise EvalError(f"{eval_jsonl}: held-out rows not found (the data stage writes eval.jsonl)")
    found: list[Messages] = []
    with open(eval_jsonl, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if len(found) >= limit:
                break
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise EvalError(f"{eval_jsonl}:{number}: not valid JSON ({exc})") from exc
            if conversation := _prompt_part(row):
                found.append(conversation)
    return found


def _prompt_part(row: dict) -> Messages:
    if row.get("messages"):
        head: Messages = []
        for message in row["messages"]:
            if message["role"] == "assistant":
                break
            head.append({"role": message["role"], "content": message["content"]})
        return head if any(m["role"] == "user" for m in head) else []
    text = (row.get("text") or "").strip()
    return [{"role": "user", "content": text.splitlines()[0][:TEXT_PROMPT_CHARS]}] if text else []
