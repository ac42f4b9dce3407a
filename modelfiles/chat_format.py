"""A chat format as Ollama can render it: the text between consecutive messages, and per-role content trimming.

A conversation renders as  J[start, r1] + c1 + J[r1, r2] + c2 + … + J[rn, generation],  where each c is a
message content, whitespace-trimmed or not according to its role r. A system message that opens the
conversation has its own role, LEADING_SYSTEM: many templates treat it apart (Gemma folds it into the
first user turn, Alpaca and Llama 3.1 into a preamble) while rendering later ones as turns of their own.
A final assistant message is left open (no junction after it) so that Ollama continues it, as Ollama's
own templates do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")  # message roles
LEADING_SYSTEM = "leading system"  # the role of a system message that opens the conversation
FORMAT_ROLES = (LEADING_SYSTEM, *ROLES)
START = "start"  # the previous "role" of the first message
GENERATION = "generation"  # the next "role" after the last message: the generation prompt

# What a template does to message content. Python's str.strip() and Jinja's `trim` remove exactly this set.
CONTENT_TRANSFORMS = ("keep", "strip", "lstrip", "rstrip")
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


def transform_content(transform: str, content: str) -> str:
    """Apply one of CONTENT_TRANSFORMS to a message's content."""
    if transform == "keep":
        return content
    if transform == "strip":
        return content.strip(WHITESPACE)
    if transform == "lstrip":
        return content.lstrip(WHITESPACE)
    if transform == "rstrip":
        return content.rstrip(WHITESPACE)
    raise ValueError(f"unknown content transform {transform!r}; expected one of {CONTENT_TRANSFORMS}")


def format_roles(roles: Sequence[str]) -> list[str]:
    """Message roles as the format sees them: a system message first in the conversation is LEADING_SYSTEM."""
    return [LEADING_SYSTEM if i == 0 and role == "system" else role for i, role in enumerate(roles)]


def junction_keys(roles: Sequence[str]) -> list[tuple[str, str]]:
    """The (previous, next) junction keys a conversation with these message roles passes through."""
    seen = format_roles(roles)
    return list(zip((START, *seen), (*seen, GENERATION), strict=True))


@dataclass(frozen=True)
class ChatFormat:
    """Junction texts keyed by (START or previous role, next role or GENERATION), content transforms by role.

    Roles here are FORMAT_ROLES (see format_roles).
    """

    junctions: Mapping[tuple[str, str], str]
    content: Mapping[str, str]

    def render(self, messages: Sequence[tuple[str, str]], *, close_final_assistant: bool = False) -> str | None:
        """The prompt for (role, content) messages, or None where a junction is unknown (the Go template refuses).

        A final assistant message stays open unless close_final_assistant, which renders the generation
        prompt after it as Hugging Face's add_generation_prompt=True does.
        """
        parts: list[str] = []
        previous = START
        for role, content in zip(format_roles([r for r, _ in messages]), [c for _, c in messages], strict=True):
            junction = self.junctions.get((previous, role))
            if junction is None:
                return None
            parts += [junction, transform_content(self.content.get(role, "keep"), content)]
            previous = role
        if previous == "assistant" and not close_final_assistant:
            return "".join(parts)
        ending = self.junctions.get((previous, GENERATION))
        if ending is None:
            return "" if previous == START else None
        return "".join(parts) + ending
