"""Derive an Ollama Go template from a Hugging Face Jinja chat template by rendering probe conversations.

Every conversation of system/user/assistant messages up to PROBE_LENGTH long (no two neighbours with the
same role: Ollama merges those) is rendered with unique sentinel contents. Where the sentinels come out in
order, the text between them is a junction (see chat_format.py); every junction must read the same in every
conversation. Content transforms (whitespace trimming) are learnt from padded contents, and the finished
format is checked against the Jinja template on every probe with several content sets before any Go
template is written. Anything the format cannot reproduce raises TemplateTranslationError.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import jinja2

from .chat_format import (
    CONTENT_TRANSFORMS,
    FORMAT_ROLES,
    LEADING_SYSTEM,
    ROLES,
    START,
    ChatFormat,
    format_roles,
    junction_keys,
)
from .go_template import go_template
from .jinja_chat import compile_chat_template, render_chat

PROBE_LENGTH = 5  # longest probe conversation; 93 role sequences
_OVERRIDE_HINT = "write the Go template by hand (config: ollama.template)"
# Two fixed clocks: a template whose output depends on strftime_now renders them differently.
_CLOCKS = (datetime(2001, 2, 3, 4, 5, 6), datetime(2033, 11, 12, 13, 14, 15))
_PADDING = (" \t\u3000", "\n\u00a0 ")  # left and right of a sentinel: tells keep/strip/lstrip/rstrip apart
_TEXTS = (
    "Hello, world!",
    "Ünïcödé: 日本語, emoji 🙂, مرحبا",
    'quotes "x" \'y\', braces {{ .Content }} {% raw %} and a backslash \\ end',
    "line 1\n\nline 2\n",
    "   ",
    "\u3000wide\u00a0spaces\u3000",
)


class TemplateTranslationError(ValueError):
    """The chat template cannot be rendered faithfully by an Ollama Go template."""


@dataclass(frozen=True)
class ChatTranslation:
    """A chat template translated for Ollama.

    format is what the Go template renders. When the runtime adds BOS itself (add_bos_token), the BOS text
    the Jinja template writes at the start is left out of it and kept in leading_bos: the token stream
    BOS + render equals the Jinja template's. default_system is the system prompt the template inserts
    when a conversation has none; accepts_system says whether a leading system message renders.
    """

    go_template: str
    format: ChatFormat
    leading_bos: str
    default_system: str | None
    accepts_system: bool


def _sentinel(i: int) -> str:
    return f"[forge-probe-{i}]"


def _role_sequences() -> list[tuple[str, ...]]:
    sequences: list[tuple[str, ...]] = [()]
    frontier: list[tuple[str, ...]] = [()]
    for _ in range(PROBE_LENGTH):
        frontier = [s + (r,) for s in frontier for r in ROLES if not s or s[-1] != r]
        sequences += frontier
    return sequences


def _split(text: str, sentinels: Sequence[str]) -> list[str] | None:
    """The texts around the sentinels if each appears exactly once and in order, else None."""
    pieces, pos = [], 0
    for s in sentinels:
        at = text.find(s, pos)
        if at < 0:
            return None
        pieces.append(text[pos:at])
        pos = at + len(s)
    pieces.append(text[pos:])
    if any(s in piece for piece in pieces for s in sentinels):
        return None
    return pieces


def _first_difference(expected: str, got: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
              min(len(expected), len(got)))
    return (f"at character {at}: the chat template has {expected[at:at + 40]!r}, "
            f"the translation {got[at:at + 40]!r}")


class _Probe:
    """Renders conversations through the Jinja template under two clocks, which must agree."""

    def __init__(self, chat_template: str, variables: Mapping[str, str]):
        try:
            self.templates = [compile_chat_template(chat_template, now) for now in _CLOCKS]
        except jinja2.TemplateSyntaxError as e:
            raise TemplateTranslationError(f"the chat template does not compile: line {e.lineno}: {e.message}; "
                                           f"{_OVERRIDE_HINT}") from e
        self.variables = dict(variables)

    def render(self, messages: Sequence[tuple[str, str]], generation: bool = True) -> str | None:
        """The Jinja rendering, or None when the template rejects the conversation."""
        chat = [{"role": r, "content": c} for r, c in messages]
        outcomes = []
        for template in self.templates:
            try:
                outcomes.append(render_chat(template, chat, add_generation_prompt=generation,
                                            variables=self.variables))
            except Exception:  # a template rejects a conversation by raising anything
                outcomes.append(None)
        if outcomes[0] != outcomes[1]:
            raise TemplateTranslationError(
                "the chat template writes the current date (strftime_now), which an Ollama template cannot "
                f"reproduce; {_OVERRIDE_HINT}")
        return outcomes[0]


def _learn_junctions(probe: _Probe) -> tuple[dict[tuple[str, str], str], list[tuple[str, ...]]]:
    """Junctions from the sentinel renders, and the accepted role sequences the Go template must reproduce."""
    junctions: dict[tuple[str, str], str] = {}
    learnt_from: dict[tuple[str, str], tuple[str, ...]] = {}
    accepted, unsplit = [], []
    for roles in _role_sequences():
        sentinels = [_sentinel(i) for i in range(len(roles))]
        text = probe.render(list(zip(roles, sentinels, strict=True)))
        if text is None:
            continue
        accepted.append(roles)
        pieces = _split(text, sentinels)
        if pieces is None:
            unsplit.append(roles)
            continue
        for key, piece in zip(junction_keys(roles), pieces, strict=True):
            if junctions.setdefault(key, piece) != piece:
                raise TemplateTranslationError(
                    f"the text between a {key[0]} and a {key[1]} message depends on earlier messages "
                    f"({list(learnt_from[key])}: {junctions[key]!r}, {list(roles)}: {piece!r}); {_OVERRIDE_HINT}")
            learnt_from.setdefault(key, roles)
    if not any(key[1] == "user" for key in junctions):
        raise TemplateTranslationError("the chat template renders no conversation with its message contents in "
                                       f"order; {_OVERRIDE_HINT}")
    for roles in unsplit:
        if all(key in junctions for key in junction_keys(roles)):
            raise TemplateTranslationError(
                f"the chat template moves, repeats or drops message contents in a {list(roles)} conversation; "
                f"{_OVERRIDE_HINT}")
    return junctions, accepted


def _learn_transforms(probe: _Probe, junctions: Mapping[tuple[str, str], str],
                      accepted: Sequence[tuple[str, ...]]) -> dict[str, str]:
    """For each of FORMAT_ROLES, which of CONTENT_TRANSFORMS the template applies to its content."""
    transforms: dict[str, str] = {}
    for role in FORMAT_ROLES:
        roles = min((s for s in accepted if role in format_roles(s)
                     and all(k in junctions for k in junction_keys(s))), key=len, default=None)
        if roles is None:
            continue
        messages = [(r, _PADDING[0] + _sentinel(i) + _PADDING[1] if seen == role else _sentinel(i))
                    for i, (r, seen) in enumerate(zip(roles, format_roles(roles), strict=True))]
        expected = probe.render(messages)
        for transform in CONTENT_TRANSFORMS:
            fmt = ChatFormat(junctions, {role: transform})
            if fmt.render(messages, close_final_assistant=True) == expected:
                transforms[role] = transform
                break
        else:
            raise TemplateTranslationError(
                f"the chat template changes {role} message contents beyond trimming whitespace; {_OVERRIDE_HINT}")
    return transforms


def _content_sets(n: int) -> list[list[str]]:
    return [
        [_PADDING[0] + f"m{i}" + _PADDING[1] for i in range(n)],
        ["" for _ in range(n)],
        [_TEXTS[i % len(_TEXTS)] for i in range(n)],
        [_TEXTS[(i + 3) % len(_TEXTS)] for i in range(n)],
    ]


def _verify(probe: _Probe, fmt: ChatFormat, accepted: Sequence[tuple[str, ...]]) -> None:
    """The format renders every accepted probe as the Jinja template does, or refuses it."""
    for roles in accepted:
        if fmt.render([(r, "") for r in roles], close_final_assistant=True) is None:
            continue  # refused: the template moves or drops content here (checked in _learn_junctions)
        for contents in _content_sets(len(roles)):
            messages = list(zip(roles, contents, strict=True))
            expected = probe.render(messages)
            got = fmt.render(messages, close_final_assistant=True)
            if expected is not None and got != expected:
                raise TemplateTranslationError(
                    f"the translation renders {messages!r} differently {_first_difference(expected, got)}; "
                    f"{_OVERRIDE_HINT}")
        if roles and roles[-1] == "assistant":
            messages = [(r, _sentinel(i)) for i, r in enumerate(roles)]
            open_prefix = fmt.render(messages)
            rendered = probe.render(messages, generation=False)
            if rendered is not None and not rendered.startswith(open_prefix):
                raise TemplateTranslationError(
                    f"without a generation prompt the chat template renders {list(roles)} differently before "
                    f"its last message; {_OVERRIDE_HINT}")


def _without_leading_bos(junctions: Mapping[tuple[str, str], str], bos: str) -> dict[tuple[str, str], str]:
    return {key: text[len(bos):] if key[0] == START and text.startswith(bos) else text
            for key, text in junctions.items()}


def _default_system(junctions: Mapping[tuple[str, str], str]) -> str | None:
    keys = ((START, LEADING_SYSTEM), (LEADING_SYSTEM, "user"), (START, "user"))
    head, between, user = (junctions.get(k) for k in keys)
    if head is None or between is None or user is None or len(user) <= len(head) + len(between):
        return None
    if user.startswith(head) and user.endswith(between):
        return user[len(head):len(user) - len(between)]
    return None


def translate_chat_template(chat_template: str, *, bos_token: str = "", eos_token: str = "",
                            add_bos_token: bool = False,
                            variables: Mapping[str, str] | None = None) -> ChatTranslation:
    """Translate a Jinja chat template into an Ollama Go template, or raise TemplateTranslationError.

    bos_token/eos_token are the token texts the template sees; add_bos_token is the GGUF's
    tokenizer.ggml.add_bos_token (llama.cpp then prepends BOS itself, so a BOS written by the template at
    the start is dropped from the Go template). variables are further template variables (unk_token, …).
    """
    probe = _Probe(chat_template, {"bos_token": bos_token, "eos_token": eos_token, **(variables or {})})
    junctions, accepted = _learn_junctions(probe)
    fmt = ChatFormat(junctions, _learn_transforms(probe, junctions, accepted))
    _verify(probe, fmt, accepted)
    leading_bos = ""
    if add_bos_token and bos_token and any(k[0] == START and t.startswith(bos_token) for k, t in junctions.items()):
        leading_bos = bos_token
        fmt = ChatFormat(_without_leading_bos(junctions, bos_token), fmt.content)
    return ChatTranslation(
        go_template=go_template(fmt),
        format=fmt,
        leading_bos=leading_bos,
        default_system=_default_system(fmt.junctions),
        accepts_system=(START, LEADING_SYSTEM) in fmt.junctions,
    )


def jinja_to_go_template(chat_template: str, bos_token: str = "", eos_token: str = "",
                         add_bos_token: bool = False) -> str:
    """The Ollama Go template for a Jinja chat template (see translate_chat_template)."""
    return translate_chat_template(chat_template, bos_token=bos_token, eos_token=eos_token,
                                   add_bos_token=add_bos_token).go_template

