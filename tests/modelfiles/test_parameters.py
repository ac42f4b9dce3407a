"""PARAMETERs are checked by name and type as Ollama reads them."""

from __future__ import annotations

import pytest
from forge.modelfiles import check_parameter
from forge.modelfiles.parameters import parse_parameter


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("temperature", 0.7, 0.7),
    ("temperature", 1, 1.0),
    ("top_p", "0.95", 0.95),
    ("min_p", ".05", 0.05),
    ("num_ctx", 4096, 4096),
    ("num_ctx", "+8192", 8192),
    ("seed", -1, -1),
    ("num_predict", "-2", -2),
    ("repeat_penalty", "1e0", 1.0),
    ("use_mmap", "F", False),
    ("use_mmap", True, True),
    ("stop", " <|im_end|> ", " <|im_end|> "),
])
def test_values_are_typed(name: str, value: object, expected: object) -> None:
    got = check_parameter(name, value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(("name", "value", "reason"), [
    ("temprature", 0.7, "unknown parameter 'temprature'"),
    ("mirostat", 1, "parameter 'mirostat' is deprecated"),
    ("penalize_newline", "true", "deprecated"),
    ("num_ctx", 4096.5, "takes an integer"),
    ("num_ctx", "4k", "takes an integer"),
    ("num_ctx", True, "takes an integer"),
    ("num_ctx", 0, "must be >= 1"),
    ("seed", "0x10", "takes an integer"),
    ("top_p", 1.5, "must be [0.0, 1.0]"),
    ("temperature", -0.1, "must be >= 0.0"),
    ("temperature", "hot", "takes a number"),
    ("temperature", float("nan"), "takes a number"),
    ("temperature", "inf", "takes a number"),
    ("temperature", 1e39, "takes a number"),
    ("use_mmap", "yes", "takes true or false"),
    ("stop", 3, "takes text"),
])
def test_bad_values_are_refused_with_the_name_and_reason(name: str, value: object, reason: str) -> None:
    with pytest.raises(ValueError, match="^.*" + reason.replace("[", r"\[").replace("]", r"\]")):
        check_parameter(name, value)


def test_modelfile_text_is_read_with_go_rules() -> None:
    assert parse_parameter("top_k", "40") == 40
    assert parse_parameter("temperature", "5.") == 5.0
    for bad in (" 40", "40 ", "4_0", "40.0"):
        with pytest.raises(ValueError, match="takes an integer"):
            parse_parameter("top_k", bad)
