"""Session fixtures for the converter tests: tiny models, SmolLM2's f16 GGUF and its quantizations."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from forge.converters import ConvertResult, convert_hf_to_gguf
from forge.converters.quantize import QuantizeResult, quantize_gguf

from .tiny_models import build_tiny_model, read_back, write_small_tokenizer


@pytest.fixture(scope="session")
def small_tokenizer_dir(smollm2_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer cut to 4096 tokens (with its chat template), for the tiny models."""
    return write_small_tokenizer(smollm2_hf_dir, tmp_path_factory.mktemp("small-tokenizer"))


@pytest.fixture(scope="session")
def tiny_model(small_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build (once per session) the tiny random model of a case; returns its HF folder."""
    built: dict[tuple[str, bool, str], Path] = {}
    root = tmp_path_factory.mktemp("tiny")

    def get(case: str, wide: bool = False, dtype: str = "float16") -> Path:
        key = (case, wide, dtype)
        if key not in built:
            out = root / f"{case}{'-wide' if wide else ''}-{dtype}"
            built[key] = build_tiny_model(case, out, small_tokenizer_dir, wide=wide, dtype=getattr(torch, dtype))
        return built[key]

    return get


@pytest.fixture(scope="session")
def smollm2_f16(smollm2_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ConvertResult:
    return convert_hf_to_gguf(smollm2_hf_dir, tmp_path_factory.mktemp("gguf") / "smollm2-f16.gguf")


@pytest.fixture(scope="session")
def smollm2_f16_read_back(smollm2_f16: ConvertResult) -> tuple[dict, dict]:
    """SmolLM2's f16 GGUF read back with gguf.GGUFReader (keys, tensors), parsed once per session."""
    return read_back(smollm2_f16.path)


@pytest.fixture(scope="session")
def smollm2_quantized(smollm2_f16: ConvertResult) -> dict[str, QuantizeResult]:
    """SmolLM2 quantized to the two default export types."""
    out = smollm2_f16.path.parent
    return {q: quantize_gguf(smollm2_f16.path, out / f"smollm2-{q}.gguf", q, nthread=2) for q in ("q8_0", "q4_k_m")}
