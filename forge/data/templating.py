"""Conversations to text with the base model's chat template, and the character spans that are trained.

The assistant turns are found by rendering the conversation prefix by prefix with the template itself,
never by guessing token ids, so any template works (ChatML, Llama 3, Gemma, Mistral, ...):

  before  = render(messages[:i], add_generation_prompt=True)   # everything the model sees before turn i
  through = render(messages[:i + 1])                           # ... and turn i itself
  turn    = through[len(before):]                              # "content<|im_end|>\n"

The trained part of a turn is `turn` without its trailing whitespace: the content and the end-of-turn
marker the template closes it with (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`), but not the
newline after it, which the model never generates because generation stops at the marker. A template
that closes a turn with nothing gets the tokenizer's EOS token inserted after the content, so the model
still learns to stop.

Templates such as Mistral's render the system prompt into the last user turn only, so a prefix renders
differently from the same turns inside the whole conversation. Then `before` is taken from rendering
the turn with a placeholder content (cut at the placeholder), and the turn is found in the full
rendering by searching forward instead of at the same offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from forge.data.errors import DataError

PLACEHOLDER = "<<forge-assistant-content>>"  # no whitespace: survives templates that trim the content


@dataclass
class Rendered:
    """Text to tokenize, the character ranges whose tokens carry labels, and how to tokenize it."""

    text: str
    spans: list[tuple[int, int]]
    add_special_tokens: bool


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, where: str) -> str:
    """The template's text for messages; a template error (e.g. roles must alternate) raises DataError."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja's TemplateError and raise_exception() calls in the template
        raise DataError(where, f"the chat template rejected this conversation: {exc}") from None


def render_chat(tokenizer: Any, messages: list[dict[str, str]], train_on: str, where: str) -> Rendered:
    """Render a conversation; spans cover the assistant turns (train_on='responses') or all text ('all')."""
    full = render(tokenizer, messages, False, where)
    turns: list[tuple[int, int, bool]] = []  # (start, end, needs EOS after it) in `full`
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = render(tokenizer, messages[: i + 1], False, where)
        prompt = _turn_prompt(tokenizer, messages, i, through, where)
        turn = through[len(prompt) :].rstrip()
        if full.startswith(through):
            start = len(prompt)
        else:
            start = full.find(turn, cursor)
            if start < 0:
                raise DataError(
                    where, f"the chat template renders assistant turn {i} differently in context; cannot mask it"
                )
        cursor = start + len(turn)
        turns.append((start, cursor, not _has_closing(turn, message["content"])))
    text, spans = _insert_eos(full, turns, tokenizer.eos_token)
    if train_on == "all":
        spans = [(0, len(text))]
    return Rendered(text, spans, add_special_tokens=False)


def _turn_prompt(tokenizer: Any, messages: list[dict[str, str]], i: int, through: str, where: str) -> str:
    """The text before assistant turn i's content in `through` (messages[:i + 1] rendered).

    First the generation prompt, which is what the model sees at inference; when the template renders the
    earlier turns differently once a reply follows (Mistral moves the system prompt), the rendering of
    the turn with a placeholder as its content, cut at the placeholder.
    """
    prompt = render(tokenizer, messages[:i], True, where)
    if through.startswith(prompt):
        return prompt
    stand_in = [*messages[:i], {"role": "assistant", "content": PLACEHOLDER}]
    placeholder = render(tokenizer, stand_in, False, where)
    at = placeholder.find(PLACEHOLDER)
    if at >= 0 and through.startswith(placeholder[:at]):
        return placeholder[:at]
    raise DataError(where, f"the chat template does not render turn {i} after its prompt; cannot mask it")


def render_text(tokenizer: Any, text: str) -> Rendered:
    """Plain text, all of it trained, with the EOS token appended so the model learns where texts end."""
    eos = tokenizer.eos_token or ""
    if eos and not text.endswith(eos):
        text += eos
    return Rendered(text, [(0, len(text))], add_special_tokens=True)


def _has_closing(turn: str, content: str) -> bool:
    """Whether the template closes the turn with something after the content (an end-of-turn marker)."""
    body = content.strip()
    if not body:
        return bool(turn.strip())
    at = turn.rfind(body)
    if at < 0:
        return True  # the template rewrote the content; trust it to close the turn
    return bool(turn[at + len(body) :].strip())


def _insert_eos(full: str, turns: list[tuple[int, int, bool]], eos: str | None) -> tuple[str, list[tuple[int, int]]]:
    """Insert eos after each turn that needs one; return the text and the turn spans in its coordinates."""
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    last = shift = 0
    for start, end, needs_eos in turns:
        pieces.append(full[last:end])
        begin = start + shift
        if needs_eos and eos:
            pieces.append(eos)
            shift += len(eos)
        spans.append((begin, end + shift))
        last = end
    pieces.append(full[last:])
    return "".join(pieces), spans
