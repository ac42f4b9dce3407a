"""Quantize an f16/bf16/f32 GGUF file with llama.cpp's own quantizer (through llama-cpp-python)."""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import ConversionError
from .gguf_stats import read_gguf_summary

# Forge's quant names -> llama.cpp's LLAMA_FTYPE_* names (llama_cpp module constants)
QUANT_TYPES: dict[str, str] = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "q3_k_s": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q3_k_l": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "f32": "LLAMA_FTYPE_ALL_F32",
}
# llama.cpp file types a quantization may start from (general.file_type): F32, F16, BF16
SOURCE_FILE_TYPES = {0: "f32", 1: "f16", 32: "bf16"}


@dataclass(frozen=True)
class QuantizeResult:
    """One quantized file, with what a manifest records about it."""

    path: Path
    qtype: str
    size_bytes: int
    bits_per_weight: float
    seconds: float
    tensor_types: dict[str, int]  # GGML type -> tensor count (shows llama.cpp's per-tensor choices)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def quantize_gguf(in_path: Path, out_path: Path, qtype: str, nthread: int | None = None) -> QuantizeResult:
    """Quantize `in_path` (an f16/bf16/f32 GGUF) to `qtype` (e.g. q4_k_m, q8_0) at `out_path`.

    Runs llama.cpp's `llama_model_quantize` with `nthread` threads (default: all CPUs). The output is
    written under a temporary name next to `out_path` and renamed when complete.
    """
    import llama_cpp

    in_path, out_path = Path(in_path), Path(out_path)
    if qtype not in QUANT_TYPES:
        raise ConversionError(f"quant type {qtype!r} is not supported; supported: {', '.join(QUANT_TYPES)}")
    if not in_path.is_file():
        raise ConversionError(f"{in_path}: input GGUF not found")
    source_type = read_gguf_summary(in_path).file_type
    if source_type not in SOURCE_FILE_TYPES:
        raise ConversionError(
            f"{in_path}: general.file_type={source_type} is already quantized; quantize from an f16/bf16/f32 GGUF"
        )
    threads = nthread or os.cpu_count() or 1
    if threads < 1:
        raise ConversionError(f"nthread must be at least 1, got {nthread}")

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[qtype])  # the C default is Q5_1: always set it
    params.nthread = threads

    start = time.perf_counter()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial-{os.getpid()}")
    try:
        status = llama_cpp.llama_model_quantize(str(in_path).encode(), str(partial).encode(), ctypes.byref(params))
        if status != 0:
            raise ConversionError(f"{in_path}: llama.cpp failed to quantize to {qtype} (status {status})")
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    summary = read_gguf_summary(out_path)
    return QuantizeResult(
        path=out_path,
        qtype=qtype,
        size_bytes=summary.size_bytes,
        bits_per_weight=round(summary.bits_per_weight, 3),
        seconds=round(time.perf_counter() - start, 3),
        tensor_types=summary.tensor_types,
    )
