"""Read a Hugging Face model folder's config.json into the plain values the converter needs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .architectures import ArchSpec, arch_spec
from .errors import ConversionError, one_line


@dataclass(frozen=True)
class ModelConfig:
    """The text model's hyperparameters, with defaults resolved by transformers."""

    path: Path  # config.json, for error messages
    architecture: str
    spec: ArchSpec
    values: dict[str, Any]  # the text config as a flat dict
    rope_full: dict[str, Any]  # rope settings of full-attention layers (rope_type, rope_theta, factor, ...)
    rope_sliding: dict[str, Any] | None  # rope settings of sliding-window layers where they differ

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def require(self, key: str) -> Any:
        if self.values.get(key) is None:
            raise ConversionError(f"{self.path}: missing required key {key!r}")
        return self.values[key]

    @property
    def n_layers(self) -> int:
        return int(self.require("num_hidden_layers"))

    @property
    def n_heads(self) -> int:
        return int(self.require("num_attention_heads"))

    @property
    def n_kv_heads(self) -> int:
        return int(self.get("num_key_value_heads") or self.n_heads)

    @property
    def head_dim(self) -> int:
        return int(self.get("head_dim") or self.require("hidden_size") // self.n_heads)

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.get("tie_word_embeddings", False))


def read_json_file(path: Path, folder_kind: str) -> Any:
    """The JSON in `path`; ConversionError naming the file (and line) when it is missing or invalid."""
    if not path.is_file():
        raise ConversionError(f"{path}: not found; expected {folder_kind}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e


def load_model_config(hf_dir: Path) -> ModelConfig:
    """Load `hf_dir/config.json`; fail early with the supported list for an unknown architecture."""
    path = hf_dir / "config.json"
    raw = read_json_file(path, "a Hugging Face model folder")
    architectures = raw.get("architectures") or []
    if not architectures:
        raise ConversionError(f"{path}: missing key 'architectures' (the model class, e.g. LlamaForCausalLM)")
    spec = arch_spec(architectures[0], str(path))

    values = _resolved_config(hf_dir)
    if "text_config" in values and isinstance(values["text_config"], dict):
        tie = values.get("tie_word_embeddings")
        values = {**values["text_config"]}
        if tie is not None:
            values.setdefault("tie_word_embeddings", tie)
    rope_full, rope_sliding = _rope_settings(values)
    return ModelConfig(path, architectures[0], spec, values, rope_full, rope_sliding)


def _resolved_config(hf_dir: Path) -> dict[str, Any]:
    """config.json with transformers' class defaults filled in (saved configs omit default values)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(hf_dir, local_files_only=True).to_dict()
    except (ValueError, KeyError) as e:
        raise ConversionError(f"{hf_dir / 'config.json'}: transformers cannot read it: {one_line(e)}") from e


def _rope_settings(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Rope settings for full and sliding layers, from transformers 5 `rope_parameters` or the older keys."""
    params = values.get("rope_parameters")
    if isinstance(params, dict) and params:
        if "full_attention" in params:
            return dict(params["full_attention"]), params.get("sliding_attention")
        return dict(params), None
    full = dict(values.get("rope_scaling") or {})
    if "type" in full and "rope_type" not in full:
        full["rope_type"] = full.pop("type")
    full.setdefault("rope_theta", values.get("rope_theta", 10000.0))
    if "partial_rotary_factor" in values:
        full.setdefault("partial_rotary_factor", values["partial_rotary_factor"])
    local_base = values.get("rope_local_base_freq")
    return full, ({"rope_type": "default", "rope_theta": local_base} if local_base else None)
