"""Read an HF tokenizer into GGUF's tokenizer keys: BPE (`gpt2`) or SentencePiece-style (`llama`).

The tokenizer is loaded through transformers, and its backend's tokenizer.json (built by transformers even
where the folder only has tokenizer.model or vocab.json + merges.txt) is the single source for tokens,
merges and pre-tokenizer. Special tokens, BOS/EOS insertion and the chat template come from transformers'
view of the folder, so they match what training used.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from .errors import ConversionError, one_line
from .pretokenizers import pre_tokenizer_name

TokenType = gguf.TokenType

# Tokens that end an assistant turn in common chat templates; written as tokenizer.ggml.eot_token_id.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eot|>")
BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
SPM_SPACE = "\u2581"  # SentencePiece's visible space


@dataclass
class Vocab:
    """Everything GGUF records about a tokenizer."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE with byte fallback)
    pre: str  # llama.cpp pre-tokenizer name ("default" for SentencePiece)
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None  # SentencePiece only
    merges: list[str] | None  # BPE only, each "left right"
    special_ids: dict[str, int]  # bos, eos, unk, pad, eot -> token id
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None  # SentencePiece only
    chat_template: str | list[dict[str, str]] | None  # one template, or named ones ("default" first)

    def write(self, writer: gguf.GGUFWriter) -> None:
        """Add the tokenizer keys to a GGUF writer."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        setters = {
            "bos": writer.add_bos_token_id,
            "eos": writer.add_eos_token_id,
            "unk": writer.add_unk_token_id,
            "pad": writer.add_pad_token_id,
            "eot": writer.add_eot_token_id,
        }
        for kind, token_id in self.special_ids.items():
            setters[kind](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def read_vocab(hf_dir: Path, n_vocab: int) -> Vocab:
    """The tokenizer of `hf_dir` as GGUF vocab, its token list padded to `n_vocab` (the embedding rows)."""
    hf_tokenizer = _load_hf_tokenizer(hf_dir)
    where = str(hf_dir / "tokenizer.json")
    spec = json.loads(hf_tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ConversionError(f"{where}: tokenizer model {model.get('type')!r} is not supported (BPE only)")
    byte_level = _is_byte_level(spec)
    if not byte_level and not model.get("byte_fallback"):
        raise ConversionError(f"{where}: BPE tokenizer is neither byte-level nor SentencePiece-style (byte_fallback)")

    pieces: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    for token_id, a in added.items():
        pieces[token_id] = a["content"]
    size = max(pieces) + 1
    if size > n_vocab:
        raise ConversionError(
            f"{where}: the tokenizer has {size} tokens but the model's embedding has {n_vocab} rows "
            "(config vocab_size); resize the model's token embeddings to the tokenizer"
        )

    tokens = [pieces.get(i, f"[PAD{i}]") for i in range(size)] + [f"[PAD{i}]" for i in range(size, n_vocab)]
    types = [_token_type(i, pieces, added, byte_level) for i in range(n_vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special_ids = _special_ids(hf_tokenizer, tokens)
    if "unk" in special_ids and not byte_level:
        types[special_ids["unk"]] = TokenType.UNKNOWN
    add_bos, add_eos = _adds_bos_eos(hf_tokenizer)
    template = hf_tokenizer.chat_template
    if isinstance(template, dict):  # named templates: GGUF keeps "default" and lists the others
        template = [{"name": name, "template": text} for name, text in template.items()]

    if byte_level:
        return Vocab(
            "gpt2",
            pre_tokenizer_name(spec.get("pre_tokenizer"), where),
            tokens,
            types,
            None,
            merges,
            special_ids,
            add_bos,
            add_eos,
            None,
            template,
        )
    return Vocab(
        "llama",
        "default",
        tokens,
        types,
        _scores_from_merges(tokens, merges),
        None,
        special_ids,
        add_bos,
        add_eos,
        _adds_space_prefix(spec),
        template,
    )


def _load_hf_tokenizer(hf_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{hf_dir}: cannot load the tokenizer: {one_line(e)}") from e
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ConversionError(f"{hf_dir}: the tokenizer has no tokenizers backend (tokenizer.json) to convert")
    return tokenizer


def _is_byte_level(spec: dict[str, Any]) -> bool:
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    return '"ByteLevel"' in text


def _token_type(token_id: int, pieces: dict[int, str], added: dict[int, dict], byte_level: bool) -> int:
    if token_id not in pieces:
        return TokenType.UNUSED
    if token_id in added:
        return TokenType.CONTROL if added[token_id].get("special") else TokenType.USER_DEFINED
    if not byte_level and BYTE_TOKEN.match(pieces[token_id]):
        return TokenType.BYTE
    return TokenType.NORMAL


def _scores_from_merges(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece scores that make llama.cpp merge in the same order as the BPE merge list.

    llama.cpp joins the adjacent pair whose joined piece scores highest; HF applies the lowest-ranked merge
    first. Scoring each piece by minus the rank of the merge that produces it gives the same order.
    """
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        rank.setdefault(left + right, r)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer puts a SentencePiece space before the text (Llama 2, Mistral: yes; Gemma: no)."""
    for step in _flatten(spec.get("normalizer"), "normalizers"):
        if step.get("type") == "Prepend" and step.get("prepend") == SPM_SPACE:
            return True
    for step in _flatten(spec.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return False


def _flatten(node: dict[str, Any] | None, children: str) -> list[dict[str, Any]]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [step for child in node.get(children, []) for step in _flatten(child, children)]
    return [node]


def _special_ids(hf_tokenizer: Any, tokens: list[str]) -> dict[str, int]:
    ids = {
        "bos": hf_tokenizer.bos_token_id,
        "eos": hf_tokenizer.eos_token_id,
        "unk": hf_tokenizer.unk_token_id,
        "pad": hf_tokenizer.pad_token_id,
    }
    for text in END_OF_TURN_TOKENS:
        if text in tokens:
            ids["eot"] = tokens.index(text)
            break
    return {kind: int(i) for kind, i in ids.items() if isinstance(i, int)}


def _adds_bos_eos(hf_tokenizer: Any) -> tuple[bool, bool]:
    """What the HF tokenizer adds around a text, observed rather than read from its many config spellings."""
    plain = hf_tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = hf_tokenizer("hello")["input_ids"]
    extra = len(full) - len(plain)
    add_bos = extra > 0 and hf_tokenizer.bos_token_id is not None and full[0] == hf_tokenizer.bos_token_id
    add_eos = extra > 0 and hf_tokenizer.eos_token_id is not None and full[-1] == hf_tokenizer.eos_token_id
    return add_bos, add_eos
