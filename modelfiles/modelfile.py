"""Ollama Modelfiles: the typed content, writing it, and reading it back with Ollama's grammar.

Grammar (Ollama's parser): an instruction name (letters, any case) and one space or tab, then a value;
PARAMETER and MESSAGE take a name (a role) and one space or tab first. A value runs to the end of the
line unless it opens a quote: "…" or \"\"\"…\"\"\" then runs over lines until, at a line end, the text
read so far ends with the same quote. Outer spaces are trimmed, the quotes removed, nothing is escaped.
`#` starts a comment where an instruction could start. Ollama silently drops characters that are not
printable (other than space, tab and newlines) from values: the writer refuses them, the reader reports them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .parameters import ParameterValue, check_parameter, format_parameter, parse_parameter

INSTRUCTIONS = ("from", "adapter", "template", "system", "parameter", "message", "license", "requires")
_OLLAMA_ONLY = ("draft", "renderer", "parser")  # valid for Ollama; Forge neither writes nor models them
_SINGLE = ("from", "adapter", "template", "system", "requires")  # Ollama keeps only the last of these
MESSAGE_ROLES = ("system", "user", "assistant")

_WORD = re.compile(r"[A-Za-z]+")
_PARAMETER_NAME = re.compile(r"[A-Za-z0-9_]+")
_SEMVER = re.compile(r"v?(0|[1-9]\d*)(\.(0|[1-9]\d*)(\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?)?)?")


class ModelfileError(ValueError):
    """A Modelfile that Ollama would reject or read differently; names the line when there is one."""

    def __init__(self, reason: str, line: int | None = None, source: str = "Modelfile"):
        self.reason, self.line, self.source = reason, line, source
        super().__init__(f"{source}, line {line}: {reason}" if line else f"{source}: {reason}")


@dataclass(frozen=True)
class Modelfile:
    """What a Modelfile says. parameters keep file order; stop may repeat, other names may not."""

    model: str
    template: str | None = None
    system: str | None = None
    parameters: tuple[tuple[str, ParameterValue], ...] = ()
    adapter: str | None = None
    licenses: tuple[str, ...] = ()
    messages: tuple[tuple[str, str], ...] = ()
    requires: str | None = None

    def __post_init__(self) -> None:
        checked = []
        for name, value in self.parameters:
            try:
                checked.append((name, check_parameter(name, value)))
            except ValueError as e:
                raise ModelfileError(str(e)) from e
            if name != "stop" and sum(n == name for n, _ in self.parameters) > 1:
                raise ModelfileError(f"parameter {name!r} is set twice")
        for role, _ in self.messages:
            if role not in MESSAGE_ROLES:
                raise ModelfileError(f"MESSAGE role must be one of {', '.join(MESSAGE_ROLES)}, got {role!r}")
        object.__setattr__(self, "parameters", tuple(checked))
        object.__setattr__(self, "licenses", tuple(self.licenses))
        object.__setattr__(self, "messages", tuple(tuple(m) for m in self.messages))

    @property
    def stops(self) -> list[str]:
        """The PARAMETER stop values in order."""
        return [value for name, value in self.parameters if name == "stop"]


def _checked_text(value: str, instruction: str) -> str:
    bad = next((c for c in value if not (c.isprintable() or c in " \t\n")), None)
    if bad is not None:
        raise ModelfileError(f"{instruction} contains U+{ord(bad):04X}, which Ollama's Modelfile parser drops")
    if '"""' in value:
        raise ModelfileError(f'{instruction} contains """, which no Modelfile quoting can hold')
    return value


def _block(value: str, instruction: str) -> str:
    return f'"""{_checked_text(value, instruction)}"""'


def _word(value: str, instruction: str) -> str:
    """Bare when the value is one word; quoted otherwise."""
    _checked_text(value, instruction)
    if value and not value.startswith('"') and not any(c.isspace() for c in value):
        return value
    return _quoted(value, instruction)


def _quoted(value: str, instruction: str) -> str:
    _checked_text(value, instruction)
    if "\n" in value or value.startswith('"') or value.endswith('"'):
        return _block(value, instruction)
    return f'"{value}"'


def render_modelfile(mf: Modelfile, header: Sequence[str] = ()) -> str:
    """The Modelfile text for mf, after checking that Ollama's grammar reads it back as exactly mf.

    header lines become `#` comments at the top.
    """
    lines = [f"# {h}" for h in header]
    lines.append(f"FROM {_word(mf.model, 'FROM')}")
    if mf.adapter is not None:
        lines.append(f"ADAPTER {_word(mf.adapter, 'ADAPTER')}")
    if mf.template is not None:
        lines.append(f"TEMPLATE {_block(mf.template, 'TEMPLATE')}")
    if mf.system is not None:
        lines.append(f"SYSTEM {_block(mf.system, 'SYSTEM')}")
    for name, value in mf.parameters:
        text = _quoted(value, f"PARAMETER {name}") if isinstance(value, str) else format_parameter(value)
        lines.append(f"PARAMETER {name} {text}")
    lines += [f"MESSAGE {role} {_block(content, 'MESSAGE')}" for role, content in mf.messages]
    lines += [f"LICENSE {_block(text, 'LICENSE')}" for text in mf.licenses]
    if mf.requires is not None:
        lines.append(f"REQUIRES {_word(mf.requires, 'REQUIRES')}")
    text = "\n".join(lines) + "\n"
    if any("\n" in h for h in header) or parse_modelfile(text) != mf:
        raise ModelfileError("the written Modelfile does not read back as it was meant")
    return text


@dataclass(frozen=True)
class _Instruction:
    line: int
    name: str  # lower case
    arg: str  # PARAMETER name or MESSAGE role, else ""
    value: str


def _unquote(text: str) -> str | None:
    """The value inside Ollama's quotes, or None while a quote is still open."""
    for quote in ('"""', '"'):
        if text.startswith(quote):
            closed = len(text) >= 2 * len(quote) and text.endswith(quote)
            return text[len(quote):-len(quote)] if closed else None
    return text


def _read_value(text: str, pos: int, line: int, word: str, source: str) -> tuple[str, int, int]:
    """Read a value from pos; returns it, the position after it, and the line it ends on."""
    start_line, newlines = line, re.compile(r"[\r\n]")
    end = pos
    while True:
        brk = newlines.search(text, end)
        end = brk.start() if brk else len(text)
        raw = text[pos:end]
        value = _unquote(raw.strip(" \t\r\n"))
        if value is not None or brk is None:
            break
        line += text[end] == "\n"
        end += 1
    if value is None:
        raise ModelfileError(f"{word} opens a quote that is never closed", start_line, source)
    bad = next((i for i, c in enumerate(raw) if not (c.isprintable() or c in " \t\r\n")), None)
    if bad is not None:
        at = start_line + raw[:bad].count("\n")
        raise ModelfileError(f"{word} contains U+{ord(raw[bad]):04X}, which Ollama's parser drops", at, source)
    return value, end, line


def _scan(text: str, source: str) -> Iterator[_Instruction]:
    pos, line = (1 if text.startswith("\ufeff") else 0), 1
    while pos < len(text):
        ch = text[pos]
        if ch in " \t\r\n":
            line += ch == "\n"
            pos += 1
            continue
        if ch == "#":
            newline = text.find("\n", pos)
            pos = newline if newline >= 0 else len(text)
            continue
        match = _WORD.match(text, pos)
        word = match.group() if match else ch
        name = word.lower()
        if name in _OLLAMA_ONLY:
            raise ModelfileError(f"{word} is valid for Ollama but not supported by Forge", line, source)
        if name not in INSTRUCTIONS:
            expected = ", ".join(i.upper() for i in INSTRUCTIONS)
            raise ModelfileError(f"unknown instruction {word!r}; expected one of {expected}", line, source)
        pos = match.end()
        if text[pos:pos + 1] not in (" ", "\t"):
            raise ModelfileError(f"{word} must be followed by a space and a value on the same line", line, source)
        pos += 1
        arg = ""
        if name in ("parameter", "message"):
            match = (_PARAMETER_NAME if name == "parameter" else _WORD).match(text, pos)
            if not match or text[match.end():match.end() + 1] not in (" ", "\t"):
                what = "a parameter name" if name == "parameter" else "a role"
                raise ModelfileError(f"{word} takes {what} after exactly one space, then a value", line, source)
            arg, pos = match.group(), match.end() + 1
            if name == "message" and arg not in MESSAGE_ROLES:
                raise ModelfileError(f"MESSAGE role must be one of {', '.join(MESSAGE_ROLES)}, got {arg!r}",
                                     line, source)
        value, pos, end_line = _read_value(text, pos, line, word, source)
        yield _Instruction(line, name, arg, value)
        line = end_line


def parse_modelfile(text: str, source: str = "Modelfile") -> Modelfile:
    """Read a Modelfile as Ollama does; ModelfileError names the line and the reason for anything wrong.

    Stricter than Ollama where Ollama would silently differ from the text: a repeated FROM, ADAPTER,
    TEMPLATE, SYSTEM, REQUIRES or non-stop PARAMETER (Ollama keeps the last), a dropped character, and a
    deprecated parameter are errors.
    """
    single: dict[str, tuple[int, str]] = {}
    parameters: list[tuple[str, ParameterValue]] = []
    parameter_lines: dict[str, int] = {}
    licenses, messages = [], []
    for ins in _scan(text, source):
        if ins.name in _SINGLE:
            if ins.name in single:
                raise ModelfileError(f"a second {ins.name.upper()} (first on line {single[ins.name][0]}); Ollama "
                                     "would keep only the last", ins.line, source)
            if ins.name in ("from", "adapter", "requires") and not ins.value:
                raise ModelfileError(f"{ins.name.upper()} needs a value", ins.line, source)
            if ins.name == "requires" and not _SEMVER.fullmatch(ins.value):
                raise ModelfileError(f"REQUIRES takes a version such as 0.6.0, got {ins.value!r}", ins.line, source)
            single[ins.name] = (ins.line, ins.value)
        elif ins.name == "parameter":
            try:
                value = parse_parameter(ins.arg, ins.value)
            except ValueError as e:
                raise ModelfileError(str(e), ins.line, source) from e
            if ins.arg != "stop" and ins.arg in parameter_lines:
                raise ModelfileError(f"parameter {ins.arg!r} is set again (first on line "
                                     f"{parameter_lines[ins.arg]})", ins.line, source)
            parameter_lines.setdefault(ins.arg, ins.line)
            parameters.append((ins.arg, value))
        elif ins.name == "message":
            messages.append((ins.arg, ins.value))
        else:
            licenses.append(ins.value)
    if "from" not in single:
        raise ModelfileError("no FROM instruction", None, source)
    get = {name: value for name, (_, value) in single.items()}.get
    return Modelfile(model=get("from"), template=get("template"), system=get("system"),
                     parameters=tuple(parameters), adapter=get("adapter"), licenses=tuple(licenses),
                     messages=tuple(messages), requires=get("requires"))


def validate(text: str, source: str = "Modelfile") -> Modelfile:
    """parse_modelfile, plus what every Modelfile Forge writes needs: a TEMPLATE (else Ollama guesses one
    from the GGUF) over .Messages, and at least one PARAMETER stop."""
    mf = parse_modelfile(text, source)
    if not mf.template:
        raise ModelfileError("no TEMPLATE: Ollama would guess the chat format", None, source)
    if ".Messages" not in mf.template:
        raise ModelfileError("the TEMPLATE does not iterate .Messages", None, source)
    if not mf.stops:
        raise ModelfileError("no PARAMETER stop: generation would not end at the end of a turn", None, source)
    return mf
