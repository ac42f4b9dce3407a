"""The generation smoke test: chat prompts through a GGUF with its own chat template, checked for stopping.

Each prompt is rendered with the GGUF's `tokenizer.chat_template` (Jinja, as llama.cpp and Ollama see it)
and generated greedily with a repeat penalty (deterministic, close to what Ollama users see by default).
A generation passes when it ends with an end-of-generation token that is a control token, within
max_tokens, and its text is neither empty nor degenerate (forge.eval.repetition).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from forge.eval.llama import bos_token, eos_token, is_control, is_eog, open_gguf, token_text
from forge.eval.repetition import find_loop

Messages = list[dict[str, str]]
CONTEXT_MARGIN = 16  # context beyond the longest prompt + max_tokens
VOCAB_CONTEXT = 64  # context of the vocabulary-only load that renders and tokenizes the prompts


@dataclass
class Generation:
    """One prompt's generation and what is wrong with it (an empty list when it passed)."""

    prompt: str
    text: str
    tokens: int
    stopped_by: str | None  # the end-of-generation token's text, None when it did not stop
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SmokeTest:
    """All generations of one GGUF, its vocabulary problems, and its speed on this machine."""

    generations: list[Generation]
    problems: list[str]
    load_seconds: float | None
    prompt_tokens_per_s: float | None
    gen_tokens_per_s: float | None

    @property
    def stopped(self) -> int:
        return sum(g.stopped_by is not None for g in self.generations)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stopped": self.stopped}


def vocabulary_problems(llm: Any) -> list[str]:
    """What is wrong with the GGUF's special tokens or chat template, before generating anything."""
    problems = []
    eos = eos_token(llm)
    if eos < 0 or eos >= llm.n_vocab():
        problems.append(f"has no valid EOS token (tokenizer.ggml.eos_token_id = {eos})")
    elif not is_control(llm, eos):
        problems.append(
            f"EOS token id {eos} ({token_text(llm, eos)!r}) is a normal text token, not a control token: "
            "generation stops in the middle of text, or never at the end of a turn"
        )
    if not llm.metadata.get("tokenizer.chat_template"):
        problems.append(
            "has no chat template (tokenizer.chat_template): chat front-ends cannot format prompts"
        )
    return problems


def render_prompt(llm: Any, messages: Messages) -> str:
    """The conversation as text through the GGUF's chat template, ending with the assistant's turn opened."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    bos, eos = bos_token(llm), eos_token(llm)
    formatter = Jinja2ChatFormatter(
        llm.metadata["tokenizer.chat_template"],
        eos_token=token_text(llm, eos) if eos >= 0 else "",
        bos_token=token_text(llm, bos) if bos >= 0 else "",
        add_generation_prompt=True,
    )
    return formatter(messages=messages).prompt


def prompt_tokens(llm: Any, messages: Messages) -> list[int]:
    """The conversation rendered with the GGUF's chat template and tokenized as llama.cpp does, with one BOS:
    where the template writes BOS and the vocabulary also adds one (Llama 3, Gemma), the added one is dropped,
    as Ollama's BOS-free template plus llama.cpp's own BOS give."""
    tokens = llm.tokenize(render_prompt(llm, messages).encode("utf-8"), add_bos=True, special=True)
    bos = bos_token(llm)
    if len(tokens) > 1 and tokens[0] == tokens[1] == bos:
        return tokens[1:]
    return tokens


def generate(llm: Any, prompt: str, tokens: list[int], max_tokens: int, repeat_penalty: float) -> Generation:
    """Greedy generation from prompt tokens, checked for a proper stop, emptiness and repetition."""
    out: list[int] = []
    stop: int | None = None
    for token in llm.generate(tokens, temp=0.0, repeat_penalty=repeat_penalty):
        if is_eog(llm, token):
            stop = token
            break
        out.append(token)
        if len(out) >= max_tokens:
            break
    text = llm.detokenize(out).decode("utf-8", errors="replace")
    gen = Generation(prompt, text, len(out), None if stop is None else token_text(llm, stop))
    if stop is None:
        gen.problems.append(_never_stopped(llm, out, max_tokens))
    elif not is_control(llm, stop):
        gen.problems.append(
            f"stopped on {gen.stopped_by!r} (id {stop}), a normal text token marked end-of-generation"
        )
    if not text.strip():
        gen.problems.append("empty answer")
    if loop := find_loop(out):
        block = llm.detokenize(out[loop.start : loop.start + loop.period]).decode("utf-8", errors="replace")
        gen.problems.append(f"degenerate: {block!r} repeated {loop.repeats} times")
    return gen


def _never_stopped(llm: Any, out: list[int], max_tokens: int) -> str:
    """Why a generation ran to max_tokens, naming special tokens it emitted that do not end generation."""
    emitted = sorted({token_text(llm, t) for t in out if is_control(llm, t)})
    hint = (
        f"; it emitted {', '.join(map(repr, emitted))}, which llama.cpp does not treat as end-of-generation"
        if emitted
        else ""
    )
    return f"did not stop within {max_tokens} tokens{hint}"


def smoke_test(
    path: Path,
    conversations: list[Messages],
    max_tokens: int,
    repeat_penalty: float = 1.1,
    threads: int | None = None,
) -> SmokeTest:
    """Check the GGUF's vocabulary, then generate for every conversation; speeds from llama.cpp's counters."""
    import llama_cpp

    with open_gguf(path, n_ctx=VOCAB_CONTEXT, vocab_only=True) as (vocab, _):
        problems = vocabulary_problems(vocab)
        if not vocab.metadata.get("tokenizer.chat_template"):
            return SmokeTest([], problems, None, None, None)
        try:
            prompts = [prompt_tokens(vocab, messages) for messages in conversations]
        except TemplateError as exc:
            problems.append(f"its chat template fails to render a conversation: {exc}")
            return SmokeTest([], problems, None, None, None)
    n_ctx = max(map(len, prompts), default=0) + max_tokens + CONTEXT_MARGIN
    with open_gguf(path, n_ctx=n_ctx, threads=threads) as (llm, load_s):
        llama_cpp.llama_perf_context_reset(llm.ctx)
        generations = [
            generate(llm, messages[-1]["content"], tokens, max_tokens, repeat_penalty)
            for messages, tokens in zip(conversations, prompts, strict=True)
        ]
        perf = llama_cpp.llama_perf_context(llm.ctx)
    prompt_tps = perf.n_p_eval / perf.t_p_eval_ms * 1e3 if perf.t_p_eval_ms > 0 else None
    gen_tps = perf.n_eval / perf.t_eval_ms * 1e3 if perf.t_eval_ms > 0 else None
    return SmokeTest(generations, problems, round(load_s, 3), prompt_tps, gen_tps)
