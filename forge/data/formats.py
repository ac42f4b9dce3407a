"""Row formats to one shape: a conversation (role/content messages) or a plain text.

  alpaca    instruction, optional input, output (optional system)
  sharegpt  conversations: [{from, value}]  (from: system, human/user, gpt/assistant)
  messages  messages: [{role, content}]     (role: system, user, assistant)
  text      text

`auto` picks the format by the keys of a row (see `detect_format`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from forge.data.errors import DataError

FORMATS = ("alpaca", "sharegpt", "messages", "text")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
}


@dataclass
class Sample:
    """A normalized row: `messages` for a conversation, or `text` for plain text (exactly one is set)."""

    messages: list[dict[str, str]] | None = None
    text: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"messages": self.messages} if self.messages is not None else {"text": self.text}


def detect_format(record: dict[str, Any]) -> str | None:
    """The format a row's keys say it is in, or None when they match none."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def describe_formats() -> str:
    return "messages, conversations (sharegpt), instruction+output (alpaca), or text"


def to_sample(record: dict[str, Any], fmt: str, where: str, system_prompt: str | None = None) -> Sample:
    """Normalize one row in format fmt; a missing or wrong field raises DataError at where."""
    if fmt == "text":
        text = _string(record, "text", where)
        if not text.strip():
            raise DataError(where, "empty text")
        return Sample(text=text)
    if fmt == "alpaca":
        messages = _alpaca(record, where)
    elif fmt == "sharegpt":
        messages = _turns(record, where, "conversations", "from", "value", SHAREGPT_ROLES)
    elif fmt == "messages":
        messages = _turns(record, where, "messages", "role", "content", {r: r for r in ROLES})
    else:
        raise DataError(where, f"unknown format '{fmt}' (formats: {', '.join(FORMATS)})")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return Sample(messages=messages)


def _string(record: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    if key not in record or record[key] is None:
        if required:
            raise DataError(where, f"missing field '{key}'")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise DataError(where, f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _alpaca(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    instruction = _string(record, "instruction", where)
    extra = _string(record, "input", where, required=False)
    output = _string(record, "output", where)
    if not instruction.strip():
        raise DataError(where, "empty field 'instruction'")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    system = _string(record, "system", where, required=False)
    if system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _turns(
    record: dict[str, Any], where: str, key: str, role_key: str, text_key: str, roles: dict[str, str]
) -> list[dict[str, str]]:
    """A list of turns under key, each {role_key, text_key}, with roles mapped through roles."""
    if key not in record or record[key] is None:
        raise DataError(where, f"missing field '{key}'")
    turns = record[key]
    if isinstance(turns, str):  # CSV cells (and some exports) hold the list as JSON text
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise DataError(where, f"field '{key}' is a string that is not a JSON list") from None
    if not isinstance(turns, list):
        raise DataError(where, f"field '{key}' must be a list, got {type(turns).__name__}")
    if not turns:
        raise DataError(where, f"empty conversation ('{key}' has no turns)")
    messages = []
    for i, turn in enumerate(turns):
        at = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(where, f"{at} must be an object, got {type(turn).__name__}")
        for field in (role_key, text_key):
            if field not in turn or turn[field] is None:
                raise DataError(where, f"{at}: missing field '{field}'")
        role, content = turn[role_key], turn[text_key]
        if not isinstance(content, str):
            raise DataError(where, f"{at}.{text_key} must be a string, got {type(content).__name__}")
        if not isinstance(role, str) or role not in roles:
            raise DataError(where, f"{at}: unknown role '{role}' (expected {', '.join(roles)})")
        messages.append({"role": roles[role], "content": content})
    return messages
