"""HF folder -> GGUF file: metadata, tokenizer, then the tensors streamed one at a time."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf

from .errors import ConversionError
from .hf_config import ModelConfig, load_model_config
from .hparams import write_hparams
from .safetensors_io import index_safetensors
from .tensors import FILE_TYPES, OUT_TYPES, PlannedTensor, plan_tensors
from .tokenizer import Vocab, read_vocab

# metadata keys a caller may set -> GGUFWriter method (all under general.*)
GENERAL_METADATA = {
    "name": "add_name",
    "basename": "add_basename",
    "finetune": "add_finetune",
    "description": "add_description",
    "author": "add_author",
    "organization": "add_organization",
    "version": "add_version",
    "license": "add_license",
    "url": "add_url",
    "source_url": "add_source_url",
    "size_label": "add_size_label",
    "quantized_by": "add_quantized_by",
}

PHI3_RULE_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion wrote."""

    path: Path
    hf_architecture: str
    gguf_architecture: str
    out_type: str
    tensor_count: int
    parameter_count: int
    size_bytes: int
    seconds: float
    tokenizer_model: str
    tokenizer_pre: str
    vocab_size: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def convert_hf_to_gguf(
    hf_dir: Path, out_path: Path, out_type: str = "f16", metadata: dict[str, str] | None = None
) -> ConvertResult:
    """Convert the HF model folder `hf_dir` (config, tokenizer, safetensors) into one GGUF file.

    `out_type` is the type of the 2-D weights: f16 (default), bf16 or f32; norms, biases and rope factors are
    always f32. `metadata` sets general.* keys (name, author, license, ...). The file is written under a
    temporary name next to `out_path` and renamed when complete.
    """
    start = time.perf_counter()
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if out_type not in OUT_TYPES:
        raise ConversionError(f"out_type {out_type!r} is not one of {', '.join(OUT_TYPES)}")
    general = _general_metadata(hf_dir, metadata or {})
    cfg = load_model_config(hf_dir)
    tensors = plan_tensors(cfg, index_safetensors(hf_dir), out_type)
    n_vocab = next(t.shape[0] for t in tensors if t.name == "token_embd.weight")
    vocab = read_vocab(hf_dir, n_vocab)
    _check_name_against_vocab(general["name"], vocab)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial-{os.getpid()}")
    try:
        _write_gguf(partial, cfg, general, vocab, FILE_TYPES[out_type], tensors)
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    return ConvertResult(
        path=out_path,
        hf_architecture=cfg.architecture,
        gguf_architecture=cfg.spec.arch_name,
        out_type=out_type,
        tensor_count=len(tensors),
        parameter_count=sum(math.prod(t.shape) for t in tensors),
        size_bytes=out_path.stat().st_size,
        seconds=round(time.perf_counter() - start, 3),
        tokenizer_model=vocab.model,
        tokenizer_pre=vocab.pre,
        vocab_size=len(vocab.tokens),
    )


def _write_gguf(
    path: Path,
    cfg: ModelConfig,
    general: dict[str, str],
    vocab: Vocab,
    file_type: gguf.LlamaFileType,
    tensors: list[PlannedTensor],
) -> None:
    """Header, keys and tensor table first, then each tensor's data, loading one tensor at a time."""
    writer = gguf.GGUFWriter(path, cfg.spec.arch_name)
    try:
        for key, value in general.items():
            getattr(writer, GENERAL_METADATA[key])(value)
        write_hparams(writer, cfg, len(vocab.tokens), file_type)
        vocab.write(writer)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, t.numpy_dtype, t.nbytes, raw_dtype=t.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(t.numpy())
    finally:
        writer.close()


def _check_name_against_vocab(name: str, vocab: Vocab) -> None:
    """llama.cpp applies Phi-3's special-token rules to any model whose general.name contains "phi3" or
    "phi-3"; they look up four tokens by text, and loading aborts (unordered_map::at) when one is missing."""
    missing = [t for t in PHI3_RULE_TOKENS if t not in vocab.tokens]
    if any(k in name.lower() for k in ("phi3", "phi-3")) and missing:
        raise ConversionError(
            f"general.name {name!r} makes llama.cpp expect Phi-3's tokens {missing}, which this tokenizer lacks; "
            "pass another name in metadata"
        )


def _general_metadata(hf_dir: Path, metadata: dict[str, str]) -> dict[str, str]:
    unknown = sorted(set(metadata) - set(GENERAL_METADATA))
    if unknown:
        raise ConversionError(f"metadata keys {unknown} are not supported; use: {', '.join(GENERAL_METADATA)}")
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise ConversionError(f"metadata values must be strings: {bad}")
    return {"name": hf_dir.resolve().name, **metadata}
