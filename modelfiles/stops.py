"""The stop list: the vocabulary's special tokens that end an assistant turn in the chat template."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .jinja_chat import compile_chat_template, render_chat

_ASSISTANT = "[forge-assistant-probe]"
# (roles, add_generation_prompt): the assistant turn is followed by a user turn, by a system turn, by the
# generation prompt, and by nothing at all.
_PROBES = (
    (("user", "assistant", "user"), True),
    (("system", "user", "assistant", "user"), True),
    (("user", "assistant", "system", "user"), True),
    (("user", "assistant"), True),
    (("user", "assistant"), False),
)


class StopTokenError(ValueError):
    """No token of the vocabulary ends an assistant turn."""


def _first_special(text: str, special_tokens: Iterable[str]) -> str | None:
    """The special token that starts leftmost in text (the longest one where several start there)."""
    found = [(text.find(t), -len(t), t) for t in special_tokens if t and t in text]
    return min(found)[2] if found else None


def _after_assistant(chat_template: str, variables: Mapping[str, str]) -> list[str]:
    template = compile_chat_template(chat_template)
    texts = []
    for roles, generation in _PROBES:
        messages = [{"role": r, "content": _ASSISTANT if r == "assistant" else f"[forge-probe-{i}]"}
                    for i, r in enumerate(roles)]
        try:
            text = render_chat(template, messages, add_generation_prompt=generation, variables=variables)
        except Exception:  # the template rejects this conversation
            continue
        if _ASSISTANT in text:
            after = text.split(_ASSISTANT, 1)[1]
            texts.append(after.split("[forge-probe-", 1)[0])
    return texts


def stop_tokens(chat_template: str, special_tokens: Iterable[str], *, bos_token: str = "", eos_token: str = "",
                variables: Mapping[str, str] | None = None) -> list[str]:
    """The special tokens that end an assistant turn, in order of appearance.

    For each way an assistant turn can be followed (next user or system turn, generation prompt, end of the
    conversation) the first special token written after the assistant's content is the one that ends it.
    special_tokens are the control and user-defined tokens of the vocabulary (the GGUF's).
    Raises StopTokenError when none of them follows an assistant turn: the model could not stop.
    """
    specials = sorted(set(special_tokens))
    texts = _after_assistant(chat_template, {"bos_token": bos_token, "eos_token": eos_token, **(variables or {})})
    stops: list[str] = []
    for text in texts:
        token = _first_special(text, specials)
        if token is not None and token not in stops:
            stops.append(token)
    if not stops:
        raise StopTokenError(
            f"no token of the vocabulary ends an assistant turn: after an assistant message the chat template "
            f"writes {sorted(set(texts))!r}, none of which contains a special token")
    return stops
