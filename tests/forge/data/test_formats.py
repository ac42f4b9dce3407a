"""Each row format normalizes to messages or text; auto-detection; bad rows name the field and reason."""

from __future__ import annotations

from typing import Any

import pytest

from forge.data.errors import DataError
from forge.data.formats import Sample, detect_format, to_sample

WHERE = "d.jsonl:7"


def conv(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in pairs]


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"messages": []}, "messages"),
        ({"conversations": [], "id": 3}, "sharegpt"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"text": "hello", "meta": 1}, "text"),
        ({"prompt": "a", "completion": "b"}, None),
        ({"instruction": "a"}, None),
    ],
)
def test_detect_format_by_keys(record: dict[str, Any], fmt: str | None) -> None:
    assert detect_format(record) == fmt


def test_alpaca_with_and_without_input_and_with_system() -> None:
    assert to_sample({"instruction": "Add", "input": "1 and 2", "output": "3"}, "alpaca", WHERE) == Sample(
        messages=conv(("user", "Add\n\n1 and 2"), ("assistant", "3"))
    )
    row = {"instruction": "Greet", "input": " ", "output": "Hi", "system": "Be kind."}
    expected = conv(("system", "Be kind."), ("user", "Greet"), ("assistant", "Hi"))
    assert to_sample(row, "alpaca", WHERE).messages == expected


def test_sharegpt_roles_map_to_chat_roles() -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q"},
            {"from": "gpt", "value": "A"},
        ]
    }
    assert to_sample(row, "sharegpt", WHERE).messages == conv(("system", "S"), ("user", "Q"), ("assistant", "A"))


def test_messages_keep_the_system_turn_and_system_prompt_fills_in_only_when_missing() -> None:
    with_system = {"messages": conv(("system", "Mine"), ("user", "Q"), ("assistant", "A"))}
    without = {"messages": conv(("user", "Q"), ("assistant", "A"))}
    assert to_sample(with_system, "messages", WHERE, system_prompt="Default").messages[0]["content"] == "Mine"
    assert to_sample(without, "messages", WHERE, system_prompt="Default").messages == conv(
        ("system", "Default"), ("user", "Q"), ("assistant", "A")
    )


def test_conversation_given_as_json_text_as_in_a_csv_cell() -> None:
    row = {"messages": '[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]'}
    assert to_sample(row, "messages", WHERE).messages == conv(("user", "Q"), ("assistant", "A"))


def test_text_format() -> None:
    assert to_sample({"text": "Once upon a time."}, "text", WHERE) == Sample(text="Once upon a time.")


@pytest.mark.parametrize(
    ("record", "fmt", "reason"),
    [
        ({"instruction": "a"}, "alpaca", "missing field 'output'"),
        ({"instruction": "a", "output": 3}, "alpaca", "field 'output' must be a string, got int"),
        ({"messages": []}, "messages", "empty conversation ('messages' has no turns)"),
        ({"conversations": []}, "sharegpt", "empty conversation ('conversations' has no turns)"),
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            "messages",
            "messages[0]: unknown role 'bot' (expected system, user, assistant)",
        ),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
            "sharegpt",
            "conversations[1]: unknown role 'robot'",
        ),
        ({"messages": [{"role": "user"}]}, "messages", "messages[0]: missing field 'content'"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, "messages", "messages[0].content must be a string"),
        ({"messages": "not json"}, "messages", "field 'messages' is a string that is not a JSON list"),
        ({"conversations": {"from": "human"}}, "sharegpt", "field 'conversations' must be a list, got dict"),
        ({"text": "  "}, "text", "empty text"),
        ({"body": "x"}, "text", "missing field 'text'"),
    ],
)
def test_bad_rows_raise_one_line_with_location_and_reason(record: dict[str, Any], fmt: str, reason: str) -> None:
    with pytest.raises(DataError) as caught:
        to_sample(record, fmt, WHERE)
    message = str(caught.value)
    assert message.startswith(f"{WHERE}: {reason}")
    assert "\n" not in message
