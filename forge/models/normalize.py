"""Write a resolved base model as a normalized HF folder: config, tokenizer with chat template, safetensors."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from forge.models.resolve import ResolvedBase
from forge.models.sentencepiece_spaces import use_sentencepiece_spaces

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GGUF_DEFAULT_DTYPE = "float32"  # dequantized GGUF blocks are exact in fp32, not in 16 bits
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
MAX_SHARD = "2GB"


def normalize_base(
    resolved: ResolvedBase, out: Path, dtype: str = "auto", trust_remote_code: bool = False
) -> dict[str, Any]:
    """Write `out` as an HF folder with safetensors weights; return facts about what was written.

    A Llama-style SentencePiece tokenizer is set to tokenize as SentencePiece and llama.cpp do
    (forge.models.sentencepiece_spaces), so that training and the GGUF see the same tokens.
    """
    out.mkdir(parents=True, exist_ok=True)
    if resolved.kind == "gguf":
        facts = _from_gguf(resolved.path, out, GGUF_DEFAULT_DTYPE if dtype == "auto" else dtype)
    else:
        facts = _from_folder(resolved.path, out, dtype, trust_remote_code)
    if use_sentencepiece_spaces(out, trust_remote_code):
        facts["tokenizer"] = "SentencePiece spaces: a space before every text fragment, as llama.cpp"
    return facts


def _from_gguf(path: Path, out: Path, dtype: str) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if not tokenizer.chat_template:
        raise ValueError(f"{path}: the GGUF carries no chat template (tokenizer.chat_template)")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=DTYPES[dtype])
    # The weights are plain dequantized tensors now; the GGUF "quantizer" marker only blocks saving.
    model.hf_quantizer = None
    for attr in ("quantization_config", "_is_quantized"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=MAX_SHARD)
    tokenizer.save_pretrained(out)
    return _facts(out, model.config, dtype, "dequantized GGUF")


def _from_folder(src: Path, out: Path, dtype: str, trust_remote_code: bool) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    native = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", "") or "").replace(
        "torch.", ""
    )
    has_safetensors = any(src.glob("*.safetensors"))
    if has_safetensors and dtype in ("auto", native):
        for f in list(src.glob("*.safetensors")) + list(src.glob("*.safetensors.index.json")):
            shutil.copyfile(f, out / f.name)  # streamed file copies: no full model in memory
        config.save_pretrained(out)
        how = "copied safetensors"
    else:
        torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
        model = AutoModelForCausalLM.from_pretrained(
            src, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
        model.save_pretrained(out, safe_serialization=True, max_shard_size=MAX_SHARD)
        config = model.config
        how = "re-saved as safetensors"
        dtype = str(model.dtype).replace("torch.", "")
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", out / "generation_config.json")
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copyfile(src / name, out / name)
    if not copied:
        AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code).save_pretrained(out)
    return _facts(out, config, native if dtype == "auto" else dtype, how)


def _facts(out: Path, config: Any, dtype: str, how: str) -> dict[str, Any]:
    weights = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    archs = getattr(config, "architectures", None) or []
    return {
        "architecture": archs[0] if archs else config.model_type,
        "model_type": config.model_type,
        "dtype": dtype,
        "how": how,
        "weights_bytes": weights,
    }
