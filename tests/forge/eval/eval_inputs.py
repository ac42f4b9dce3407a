"""Real inputs for the eval tests: a held-out split, GGUFs made by Forge's converter, a GGUF with a bad EOS.

Shared by tests/forge/eval (through conftest.py) and tests/forge/stages/test_eval.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf

from forge.config import DataConfig


def write_heldout(hf_dir: Path, out: Path) -> Path:
    """The data stage's files for the builtin sample dataset, templated with the model's tokenizer."""
    from transformers import AutoTokenizer

    from forge.data.build import prepare, write_prepared
    from forge.data.readers import resolve_dataset

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prepared = prepare(resolve_dataset("builtin:sample", out), tokenizer, DataConfig(), log=lambda _: None)
    out.mkdir(parents=True, exist_ok=True)
    write_prepared(prepared, out, tokenizer)
    return out


def make_ggufs(hf_dir: Path, out: Path, quants: tuple[str, ...]) -> dict[str, Path]:
    """model-f16.gguf converted by Forge's converter, and each quant made from it by llama.cpp."""
    from forge.converters import convert_hf_to_gguf
    from forge.converters.quantize import quantize_gguf

    f16 = convert_hf_to_gguf(hf_dir, out / "model-f16.gguf", "f16").path
    return {"f16": f16} | {q: quantize_gguf(f16, out / f"model-{q}.gguf", q, nthread=1).path for q in quants}


def with_eos(src: Path, dst: Path, token: str) -> Path:
    """A copy of the GGUF at src whose tokenizer.ggml.eos_token_id points to `token` (rewritten in place)."""
    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(dst, "r+")
    token_id = reader.fields["tokenizer.ggml.tokens"].contents().index(token)
    reader.fields["tokenizer.ggml.eos_token_id"].parts[-1][0] = token_id
    reader.data.flush()
    return dst


def with_add_bos(src: Path, dst: Path) -> Path:
    """A copy of the GGUF at src whose vocabulary adds BOS to every tokenization (rewritten in place)."""
    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(dst, "r+")
    reader.fields["tokenizer.ggml.add_bos_token"].parts[-1][0] = True
    reader.data.flush()
    return dst
