"""Make a Llama-style SentencePiece tokenizer put its word-start space where SentencePiece and llama.cpp do.

Llama 2, Mistral v0.x and Phi-3 were trained with SentencePiece, which puts a "▁" before the text it encodes,
whatever the text starts with. Text around special tokens is encoded piece by piece, so every fragment that
starts the input or follows a special token gets one; llama.cpp does exactly this (`add_space_prefix`).
transformers 5 rebuilds such tokenizers (LlamaTokenizer) with `Metaspace(prepend_scheme="first")`, whatever
tokenizer.json says: a space before the first fragment only, and none before a fragment that already starts with
a space. The rewrite gives the folder SentencePiece's own normalizer (Prepend "▁", Replace " " -> "▁") and names
the generic fast tokenizer class, which transformers loads exactly as tokenizer.json says. Training data and
llama.cpp then see the same tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPM_SPACE = "\u2581"
SENTENCEPIECE_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": SPM_SPACE},
        {"type": "Replace", "pattern": {"String": " "}, "content": SPM_SPACE},
    ],
}
GENERIC_CLASS = "PreTrainedTokenizerFast"
# tokenizer_config keys that only steer how the Llama class rebuilds its pre-tokenizer
REBUILD_KEYS = ("legacy", "add_prefix_space")


def use_sentencepiece_spaces(folder: Path, trust_remote_code: bool = False) -> bool:
    """Rewrite the folder's tokenizer as described above when transformers loads it as a SentencePiece-style BPE
    (byte fallback) with a Metaspace pre-tokenizer that prepends a space; return whether it did."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    if not _prepends_with_metaspace(spec):
        return False
    spec["normalizer"] = SENTENCEPIECE_NORMALIZER
    spec["pre_tokenizer"] = None
    rewrites = {"tokenizer.json": spec}
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():  # without one, transformers already uses the generic class
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config = {k: v for k, v in config.items() if k not in REBUILD_KEYS}
        rewrites["tokenizer_config.json"] = {**config, "tokenizer_class": GENERIC_CLASS}
    for name, content in rewrites.items():
        partial = folder / f".{name}.partial"
        partial.write_text(json.dumps(content, ensure_ascii=False, indent=2), encoding="utf-8")
        partial.replace(folder / name)
    return True


def _prepends_with_metaspace(spec: dict[str, Any]) -> bool:
    model, pre, normalizer = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    return (
        model.get("type") == "BPE"
        and bool(model.get("byte_fallback"))
        and normalizer is None
        and pre.get("type") == "Metaspace"
        and pre.get("replacement") == SPM_SPACE
        and pre.get("prepend_scheme", "always") != "never"
    )
