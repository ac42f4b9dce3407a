"""Render Hugging Face Jinja chat templates with the environment transformers' apply_chat_template uses."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = Mapping[str, str]


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` marks assistant text for transformers' masks; it renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # transformers replaces Jinja's HTML-escaping tojson with plain json.dumps
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str, now: datetime | None = None) -> jinja2.Template:
    """Compile a chat template; `strftime_now` formats `now` (the current time when None).

    Raises jinja2.TemplateSyntaxError for a template that does not compile.
    """
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: (now or datetime.now()).strftime(fmt)
    return env.from_string(source)


def render_chat(template: jinja2.Template, messages: Sequence[Message], *, add_generation_prompt: bool,
                variables: Mapping[str, Any]) -> str:
    """Render messages as apply_chat_template(tokenize=False) does; variables hold bos_token, eos_token, …"""
    return template.render(
        messages=[dict(m) for m in messages], tools=None, documents=None,
        add_generation_prompt=add_generation_prompt, **variables,
    )
