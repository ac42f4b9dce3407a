"""Ollama PARAMETER names, their types, and how values are read from and written to a Modelfile."""

from __future__ import annotations

import re

ParameterValue = int | float | bool | str

# Ollama's api.Options fields: name -> type. stop is the only list (one PARAMETER line per entry).
PARAMETER_TYPES: dict[str, type] = {
    "num_ctx": int, "num_batch": int, "num_gpu": int, "main_gpu": int, "num_thread": int, "num_keep": int,
    "seed": int, "num_predict": int, "top_k": int, "repeat_last_n": int, "draft_num_predict": int,
    "use_mmap": bool,
    "top_p": float, "min_p": float, "typical_p": float, "temperature": float, "repeat_penalty": float,
    "presence_penalty": float, "frequency_penalty": float,
    "stop": str,
}
# Accepted by older Ollama, now warned about and dropped: never written.
DEPRECATED_PARAMETERS = frozenset({
    "penalize_newline", "mirostat", "mirostat_tau", "mirostat_eta", "use_mlock", "low_vram", "f16_kv",
    "logits_all", "vocab_only",
})
# Bounds (inclusive; None = open) where a value outside is a mistake rather than a choice.
PARAMETER_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "temperature": (0.0, None), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0), "typical_p": (0.0, 1.0),
    "num_ctx": (1, None), "top_k": (0, None), "repeat_penalty": (0.0, None),
}

_INT = re.compile(r"[+-]?[0-9]+")  # Go strconv.ParseInt(s, 10, 64)
_FLOAT = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")  # decimal forms of ParseFloat
_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
          "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}
_FLOAT32_MAX = 3.4028234663852886e38
_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "text"}


def _check_known(name: str) -> type:
    if name in DEPRECATED_PARAMETERS:
        raise ValueError(f"parameter {name!r} is deprecated: Ollama ignores it")
    if name not in PARAMETER_TYPES:
        raise ValueError(f"unknown parameter {name!r}; known: {', '.join(sorted(PARAMETER_TYPES))}")
    return PARAMETER_TYPES[name]


def _check_bounds(name: str, value: int | float) -> None:
    low, high = PARAMETER_BOUNDS.get(name, (None, None))
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"parameter {name!r} must be {span}, got {value}")


def parse_parameter(name: str, text: str) -> ParameterValue:
    """A PARAMETER value as Ollama reads it from a Modelfile (Go's strconv rules); ValueError says why not."""
    kind = _check_known(name)
    if kind is str:
        return text
    if kind is bool:
        if text not in _BOOLS:
            raise ValueError(f"parameter {name!r} takes true or false, got {text!r}")
        return _BOOLS[text]
    if kind is int:
        if not _INT.fullmatch(text) or not -(2**63) <= int(text) < 2**63:
            raise ValueError(f"parameter {name!r} takes an integer, got {text!r}")
        value: int | float = int(text)
    else:
        if not _FLOAT.fullmatch(text) or abs(float(text)) > _FLOAT32_MAX:
            raise ValueError(f"parameter {name!r} takes a number, got {text!r}")
        value = float(text)
    _check_bounds(name, value)
    return value


def check_parameter(name: str, value: object) -> ParameterValue:
    """A parameter value from a config (typed, or text as on a Modelfile line), checked and typed."""
    kind = _check_known(name)
    if isinstance(value, str):
        return parse_parameter(name, value if kind is str else value.strip())
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if (kind is bool and isinstance(value, bool)) or (kind is int and is_number and isinstance(value, int)):
        return parse_parameter(name, format_parameter(value))
    if kind is float and is_number:
        return parse_parameter(name, format_parameter(float(value)))
    raise ValueError(f"parameter {name!r} takes {_KIND_NAMES[kind]}, got {value!r}")


def format_parameter(value: ParameterValue) -> str:
    """A typed parameter value as Modelfile text (strings are quoted by the caller)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)
