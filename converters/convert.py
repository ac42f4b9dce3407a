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

# short metadata names a caller may use -> their general.* key
GENERAL_METADATA = {
    "name": gguf.Keys.General.NAME,
    "basename": gguf.Keys.General.BASENAME,
    "finetune": gguf.Keys.General.FINETUNE,
    "description": gguf.Keys.General.DESCRIPTION,
    "author": gguf.Keys.General.AUTHOR,
    "organization": gguf.Keys.General.ORGANIZATION,
    "version": gguf.Keys.General.VERSION,
    "license": gguf.Keys.General.LICENSE,
    "url": gguf.Keys.General.URL,
    "source_url": gguf.Keys.General.SOURCE_URL,
    "size_label": gguf.Keys.General.SIZE_LABEL,
    "quantized_by": gguf.Keys.General.QUANTIZED_BY,
}
# keys the converter writes itself; a caller's metadata may not set them (nor tokenizer.* or {arch}.* keys)
RESERVED_KEYS = (
    gguf.Keys.General.ARCHITECTURE,
    gguf.Keys.General.FILE_TYPE,
    gguf.Keys.General.QUANTIZATION_VERSION,
    gguf.Keys.General.ALIGNMENT,
)
MetadataValue = str | bool | int | float | list[str]

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
    hf_dir: Path, out_path: Path, out_type: str = "f16", metadata: dict[str, MetadataValue] | None = None
) -> ConvertResult:
    """Convert the HF model folder `hf_dir` (config, tokenizer, safetensors) into one GGUF file.

    `out_type` is the type of the 2-D weights: f16 (default), bf16 or f32; norms, biases and rope factors are
    always f32. `metadata` adds keys: short names set general.* strings (name, author, license, ...); full keys
    (`general.base_model.count`, `forge.dataset.sha256`, ...) take str, bool, int (uint32, or int64 when out of
    its range), float (float32) or a list of str. The file is written under a temporary name next to
    `out_path` and renamed when complete.
    """
    start = time.perf_counter()
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if out_type not in OUT_TYPES:
        raise ConversionError(f"out_type {out_type!r} is not one of {', '.join(OUT_TYPES)}")
    general = _general_metadata(hf_dir, metadata or {})
    cfg = load_model_config(hf_dir)
    _check_not_reserved(general, cfg.spec.arch_name)
    tensors = plan_tensors(cfg, index_safetensors(hf_dir), out_type)
    n_vocab = next(t.shape[0] for t in tensors if t.name == "token_embd.weight")
    vocab = read_vocab(hf_dir, n_vocab)
    _check_name_against_vocab(general[gguf.Keys.General.NAME], vocab)

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
    general: dict[str, MetadataValue],
    vocab: Vocab,
    file_type: gguf.LlamaFileType,
    tensors: list[PlannedTensor],
) -> None:
    """Header, keys and tensor table first, then each tensor's data, loading one tensor at a time."""
    writer = gguf.GGUFWriter(path, cfg.spec.arch_name)
    try:
        for key, value in general.items():
            writer.add_key_value(key, value, *_value_type(value))
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


def _general_metadata(hf_dir: Path, metadata: dict[str, MetadataValue]) -> dict[str, MetadataValue]:
    """The caller's metadata keyed by full GGUF key, general.name defaulting to the folder's name."""
    unknown = sorted(k for k in metadata if "." not in k and k not in GENERAL_METADATA)
    if unknown:
        raise ConversionError(
            f"metadata keys {unknown} are not supported; use: {', '.join(GENERAL_METADATA)} or a full key "
            "(general.* or your own namespace, e.g. forge.version)"
        )
    keyed = {GENERAL_METADATA.get(k, k): v for k, v in metadata.items()}
    bad = [k for k, v in keyed.items() if k in GENERAL_METADATA.values() and not isinstance(v, str)]
    if bad:
        raise ConversionError(f"metadata values must be strings: {bad}")
    for key, value in keyed.items():
        _value_type(value, key)
    return {gguf.Keys.General.NAME: hf_dir.resolve().name, **keyed}


def _check_not_reserved(metadata: dict[str, MetadataValue], arch: str) -> None:
    taken = sorted(k for k in metadata if k in RESERVED_KEYS or k.startswith(("tokenizer.", f"{arch}.")))
    if taken:
        raise ConversionError(f"metadata keys {taken} are written by the converter itself; leave them out")


def _value_type(value: MetadataValue, key: str = "") -> tuple[gguf.GGUFValueType, ...]:
    """The GGUF type of a metadata value (and of its items, for a list)."""
    T = gguf.GGUFValueType
    if isinstance(value, bool):
        return (T.BOOL,)
    if isinstance(value, int):
        return (T.UINT32,) if 0 <= value < 2**32 else (T.INT64,)
    if isinstance(value, float):
        return (T.FLOAT32,)
    if isinstance(value, str):
        return (T.STRING,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return T.ARRAY, T.STRING
    raise ConversionError(
        f"metadata {key!r}: a {type(value).__name__} is not a GGUF value (str, bool, int, float or a non-empty "
        "list of str)"
    )
