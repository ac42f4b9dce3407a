"""Write a ChatFormat as an Ollama TEMPLATE: a Go text/template over .Messages.

Every byte the template emits comes from a Go string literal inside an action, escaped to printable ASCII:
the template's own text is layout only (trimmed by `{{-`), and Ollama's Modelfile parser, which drops
non-printable characters, cannot alter it. Unknown junctions execute an undefined template whose name is
the reason, so Ollama reports an error instead of rendering a prompt the model was never trained on.
"""

from __future__ import annotations

from .chat_format import FORMAT_ROLES, GENERATION, LEADING_SYSTEM, ROLES, START, WHITESPACE, ChatFormat

_STRIP_DEFINES = {"lstrip": ("forge.lstrip",), "rstrip": ("forge.rstrip",), "strip": ("forge.strip", "forge.rstrip")}


def go_string(text: str) -> str:
    """A Go interpreted string literal for text, in printable ASCII."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif " " <= ch <= "~":
            out.append(ch)
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def _emit(text: str) -> str:
    return f"{{{{ {go_string(text)} }}}}" if text else ""


def _refuse(reason: str) -> str:
    return f"{{{{ template {go_string('forge: ' + reason)} . }}}}"


def _a(role: str) -> str:
    return {"assistant": "an assistant", LEADING_SYSTEM: "a leading system"}.get(role, f"a {role}")


def _describe(previous: str, role: str) -> str:
    if previous == START:
        role = "system" if role == LEADING_SYSTEM else role
        return f"this model's chat template does not accept a conversation that starts with {_a(role)} message"
    return f"this model's chat template does not accept {_a(role)} message after {_a(previous)} message"


def _whitespace_by_length() -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for ch in WHITESPACE:
        groups.setdefault(len(ch.encode()), []).append(go_string(ch))
    return groups


def _strip_define(name: str, side: str, done: str) -> list[str]:
    """A recursive define removing WHITESPACE on one side; `done` is the action run on what is left."""
    lines = [f"{{{{- define {go_string(name)} }}}}"]
    for i, (size, chars) in enumerate(sorted(_whitespace_by_length().items())):
        keyword = "if" if i == 0 else "else if"
        # text/template has no arithmetic: len (slice . n) is len(.) - n
        edge = f"(slice . 0 {size})" if side == "left" else f"(slice . (len (slice . {size})))"
        rest = f"(slice . {size})" if side == "left" else f"(slice . 0 (len (slice . {size})))"
        lines.append(
            f"{{{{- {keyword} and (ge (len .) {size}) (eq {edge} {' '.join(chars)}) }}}}"
            f"{{{{ template {go_string(name)} {rest} }}}}"
        )
    lines += [f"{{{{- else }}}}{done}", "{{- end }}", "{{- end }}"]
    return lines


def _defines(transforms: set[str]) -> list[str]:
    names = {name for t in transforms for name in _STRIP_DEFINES.get(t, ())}
    lines: list[str] = []
    if "forge.lstrip" in names:
        lines += _strip_define("forge.lstrip", "left", "{{ . }}")
    if "forge.strip" in names:
        lines += _strip_define("forge.strip", "left", '{{ template "forge.rstrip" . }}')
    if "forge.rstrip" in names:
        lines += _strip_define("forge.rstrip", "right", "{{ . }}")
    return lines


def _content_expression(transform: str) -> str:
    return ".Content" if transform == "keep" else f'template "forge.{transform}" .Content'


def _content_lines(content: dict[str, str]) -> list[str]:
    by_transform: dict[str, list[str]] = {}
    for role in FORMAT_ROLES:
        by_transform.setdefault(content.get(role, "keep"), []).append(role)
    if len(by_transform) == 1:
        return [f"{{{{- {_content_expression(next(iter(by_transform)))} }}}}"]
    lines = []
    for i, (transform, roles) in enumerate(by_transform.items()):
        action = f"{{{{ {_content_expression(transform)} }}}}"
        if i == len(by_transform) - 1:
            lines.append("{{- else }}" + action)
        else:
            keyword = "if" if i == 0 else "else if"
            lines.append(f"{{{{- {keyword} eq $role {' '.join(go_string(r) for r in roles)} }}}}{action}")
    return [*lines, "{{- end }}"]


def _prev_value(role: str) -> str:
    return go_string("" if role == START else role)


def _opening_lines(fmt: ChatFormat) -> list[str]:
    lines = []
    for i, previous in enumerate((START, *FORMAT_ROLES)):
        lines.append(f"{{{{- {'if' if i == 0 else 'else if'} eq $prev {_prev_value(previous)} }}}}")
        nexts = (LEADING_SYSTEM, "user", "assistant") if previous == START else ROLES
        for k, role in enumerate(nexts):
            junction = fmt.junctions.get((previous, role))
            action = _refuse(_describe(previous, role)) if junction is None else _emit(junction)
            lines.append(f"{{{{- {'if' if k == 0 else 'else if'} eq $role {go_string(role)} }}}}{action}")
        lines += ["{{- else }}" + _refuse("this model's chat template accepts only system, user and assistant "
                                          "messages"), "{{- end }}"]
    return [*lines, "{{- end }}"]


def _closing_lines(fmt: ChatFormat) -> list[str]:
    lines = []
    for i, previous in enumerate((START, LEADING_SYSTEM, "system", "user")):
        ending = fmt.junctions.get((previous, GENERATION))
        if ending is None and previous != START:
            name = "system" if previous == LEADING_SYSTEM else previous
            action = _refuse(f"this model's chat template does not accept a conversation that ends with a {name} "
                             "message")
        else:
            action = _emit(ending or "")
        lines.append(f"{{{{- {'if' if i == 0 else 'else if'} eq $prev {_prev_value(previous)} }}}}{action}")
    return [*lines, "{{- end }}"]


def go_template(fmt: ChatFormat) -> str:
    """The Ollama TEMPLATE that renders .Messages exactly as fmt.render does (final assistant message left open)."""
    lines = ["{{- /* Generated by Forge from the model's Hugging Face chat template. */ -}}"]
    lines += _defines(set(fmt.content.values()))
    lines += ['{{- $prev := "" }}', "{{- range .Messages }}", "{{- $role := .Role }}",
              f'{{{{- if and (eq $prev "") (eq .Role "system") }}}}{{{{ $role = {go_string(LEADING_SYSTEM)} }}}}'
              "{{ end }}"]
    lines += _opening_lines(fmt)
    lines += _content_lines(dict(fmt.content))
    lines += ["{{- $prev = $role }}", "{{- end }}"]
    lines += _closing_lines(fmt)
    return "\n".join(lines)
