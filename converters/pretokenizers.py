"""Name the BPE pre-tokenizer of a tokenizer.json the way llama.cpp knows it (`tokenizer.ggml.pre`).

llama.cpp re-implements each pre-tokenizer by name; an unknown name is fatal at load and a missing one
silently degrades tokenization. We identify it from the tokenizer.json structure: the split regexes, a
byte-level step that splits with GPT-2's built-in regex, and a digit splitter.
"""

from __future__ import annotations

from typing import Any

from .errors import ConversionError

GPT2_REGEX = "<ByteLevel use_regex>"  # ByteLevel(use_regex=True) splits with GPT-2's regex
DIGITS = "<Digits individual>"

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
TEKKEN_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
GPT4O_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# pre-tokenizer steps (in order) -> llama.cpp pre-tokenizer name
KNOWN_PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    (GPT2_REGEX,): "gpt-2",
    (DIGITS, GPT2_REGEX): "smollm",  # SmolLM/SmolLM2, StarCoder-style: digits one by one, then GPT-2
    (LLAMA3_REGEX,): "llama-bpe",  # Llama 3.x
    (QWEN2_REGEX,): "qwen2",  # Qwen2, Qwen2.5, Qwen3
    (TEKKEN_REGEX,): "tekken",  # Mistral Nemo and later Mistral tokenizers
    (GPT4O_REGEX,): "gpt-4o",  # Phi-4 (mini)
}


def pre_tokenizer_steps(pre_tokenizer: dict[str, Any] | None) -> tuple[str, ...]:
    """The splitting steps of a tokenizer.json `pre_tokenizer`, flattened, as comparable strings."""
    if not pre_tokenizer:
        return ()
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        return tuple(s for p in pre_tokenizer.get("pretokenizers", []) for s in pre_tokenizer_steps(p))
    if kind == "ByteLevel":
        return (GPT2_REGEX,) if pre_tokenizer.get("use_regex", True) else ()
    if kind == "Digits":
        return (DIGITS,) if pre_tokenizer.get("individual_digits") else ("<Digits grouped>",)
    if kind == "Split":
        pattern = pre_tokenizer.get("pattern", {})
        return (pattern.get("Regex") or pattern.get("String") or "",)
    return (f"<{kind}>",)


def pre_tokenizer_name(pre_tokenizer: dict[str, Any] | None, path: str) -> str:
    """llama.cpp's name for this BPE pre-tokenizer, or a ConversionError naming the known ones."""
    steps = pre_tokenizer_steps(pre_tokenizer)
    name = KNOWN_PRE_TOKENIZERS.get(steps)
    if name is None:
        raise ConversionError(
            f"{path}: pre_tokenizer {list(steps)} is not one llama.cpp is known to implement; "
            f"known: {', '.join(sorted(set(KNOWN_PRE_TOKENIZERS.values())))}"
        )
    return name
