"""PEFT LoRA adapter -> llama.cpp LoRA adapter GGUF, over the GGUF that the converter makes of its base.

llama.cpp's adapter format: `general.type` = adapter, `adapter.type` = lora, one `adapter.lora.alpha` for the
whole file, `general.architecture` equal to the base GGUF's, and for each adapted base tensor `<name>.lora_a`
(PEFT's lora_A, [r, in]) and `<name>.lora_b` (PEFT's lora_B, [out, r]). llama.cpp scales every pair by
alpha / r with r read from the tensor shapes, so a module whose PEFT scale differs from that (rsLoRA's
alpha / sqrt(r), rank and alpha patterns) carries the difference in its lora_b. lora_b rows of Q and K are
permuted exactly like the base's Q/K rows (Llama-style architectures).
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open

from .architectures import GLOBAL_TENSORS
from .convert import MetadataValue, _general_metadata, _value_type
from .errors import ConversionError
from .hf_config import ModelConfig, load_model_config, read_json_file
from .safetensors_io import StoredTensor, index_safetensors
from .tensors import BLOCK_NAME, OUT_TYPES, PlannedTensor, _text_model_name

T = gguf.MODEL_TENSOR
PEFT_PREFIX = "base_model.model."
LORA_WEIGHT = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_COPY = ".base_layer.weight"
# keys the adapter format sets itself; a caller's metadata may not set them
ADAPTER_KEYS = (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.TYPE)
ADAPTER_PREFIX = "adapter."

# adapter_config.json options a llama.cpp LoRA cannot express (refused when set), and why
INEXPRESSIBLE = {
    "use_dora": "DoRA rescales each output by a trained magnitude",
    "lora_bias": "lora_B carries a trained bias",
    "modules_to_save": "it trains full copies of modules (e.g. embeddings, lm_head), not low-rank updates",
    "trainable_token_indices": "it trains embedding rows, not low-rank updates",
    "fan_in_fan_out": "its weights are stored transposed (Conv1D)",
    "layer_replication": "it changes the base model's layers",
    "target_parameters": "it adapts parameters, not Linear layers",
    "use_qalora": "QA-LoRA pools the layer input",
    "alora_invocation_tokens": "activated LoRA switches on after invocation tokens",
    "use_bdlora": "block-diagonal LoRA is not a plain B @ A",
    "velora_config": "VeLoRA changes the layer's computation",
    "monteclora_config": "MonteCLoRA samples its update",
    "arrow_config": "Arrow routes between several adapters",
    "kasa_config": "KaSA changes the layer's computation",
}
# initialisations that also change the base weights: the adapter is relative to a base Forge does not have
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class AdapterConvertResult:
    """What an adapter conversion wrote."""

    path: Path
    gguf_architecture: str
    out_type: str
    alpha: float  # adapter.lora.alpha: llama.cpp scales each pair by alpha / r
    modules: int  # adapted base tensors (each a lora_a + lora_b pair)
    ranks: list[int]
    rescaled: int  # modules whose lora_b carries a scale other than alpha / r (rsLoRA, patterns)
    size_bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


@dataclass(frozen=True)
class LoraSettings:
    """The scale-relevant part of adapter_config.json."""

    r: int
    alpha: float
    rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    @property
    def written_alpha(self) -> float:
        """adapter.lora.alpha: the default scale times the default rank, so that modules without a pattern
        keep lora_b as trained (llama.cpp's alpha / r is then exactly PEFT's scale)."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r) * self.r

    def rank_and_scale(self, module: str) -> tuple[int, float]:
        """PEFT's rank and scale of a module (its patterns match the module name's tail, as in PEFT)."""
        r = int(_pattern_value(self.rank_pattern, module, self.r))
        alpha = float(_pattern_value(self.alpha_pattern, module, self.alpha))
        return r, alpha / (math.sqrt(r) if self.rslora else r)


def convert_lora_to_gguf(
    adapter_dir: Path,
    base_dir: Path,
    out_path: Path,
    out_type: str = "f16",
    metadata: dict[str, MetadataValue] | None = None,
) -> AdapterConvertResult:
    """Convert the PEFT LoRA folder `adapter_dir` (adapter_config.json + adapter_model.safetensors), trained on
    the HF model folder `base_dir`, into a llama.cpp LoRA GGUF for the GGUF that `convert_hf_to_gguf(base_dir)`
    writes.

    `out_type` (f16, bf16, f32) is the type of the LoRA matrices. `metadata` adds keys as convert_hf_to_gguf's
    does (general.* strings by short name, other keys by full name, typed); general.name defaults to the adapter
    folder's name. Keys the adapter format sets (general.architecture, general.type, adapter.*) are refused.
    Adapters llama.cpp cannot express (DoRA, biases, modules_to_save, LoRA on embeddings, ...) are refused with
    a one-line ConversionError. The file is written under a temporary name and renamed when complete.
    """
    start = time.perf_counter()
    adapter_dir, base_dir, out_path = Path(adapter_dir), Path(base_dir), Path(out_path)
    if out_type not in OUT_TYPES:
        raise ConversionError(f"out_type {out_type!r} is not one of {', '.join(OUT_TYPES)}")
    general = _adapter_metadata(adapter_dir, metadata or {})
    settings = read_adapter_settings(adapter_dir)
    cfg = load_model_config(base_dir)
    pairs, base_copies = _read_pairs(adapter_dir / ADAPTER_WEIGHTS)
    base = index_safetensors(base_dir)
    _check_base_copies(base_copies, base, adapter_dir / ADAPTER_WEIGHTS)
    alpha = float(np.float32(settings.written_alpha))  # as stored in the file and used by llama.cpp
    tensors, ranks, rescaled = _plan(pairs, settings, alpha, cfg, base, adapter_dir, out_type)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial-{os.getpid()}")
    try:
        _write(partial, cfg.spec.arch_name, general, alpha, tensors)
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    return AdapterConvertResult(
        path=out_path,
        gguf_architecture=cfg.spec.arch_name,
        out_type=out_type,
        alpha=alpha,
        modules=len(tensors) // 2,
        ranks=sorted(set(ranks)),
        rescaled=rescaled,
        size_bytes=out_path.stat().st_size,
        seconds=round(time.perf_counter() - start, 3),
    )


def read_adapter_settings(adapter_dir: Path) -> LoraSettings:
    """adapter_config.json checked for what a llama.cpp LoRA can express; ConversionError names the key."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    config = read_json_file(path, "a PEFT LoRA adapter folder")
    if config.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"{path}: peft_type {config['peft_type']!r} is not LORA")
    for key, why in INEXPRESSIBLE.items():
        if config.get(key):
            raise ConversionError(f"{path}: {key} is set; a llama.cpp LoRA adapter cannot express it ({why})")
    if config.get("bias", "none") != "none":
        raise ConversionError(f"{path}: bias is {config['bias']!r}; a llama.cpp LoRA adapter has no trained biases")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise ConversionError(
            f"{path}: init_lora_weights {init!r} also changes the base weights; the adapter does not fit the base"
        )
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), int | float) or config[key] <= 0:
            raise ConversionError(f"{path}: {key!r} must be a positive number, got {config.get(key)!r}")
    return LoraSettings(
        r=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        rslora=bool(config.get("use_rslora")),
        rank_pattern=dict(config.get("rank_pattern") or {}),
        alpha_pattern=dict(config.get("alpha_pattern") or {}),
    )


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_pairs(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """lora_A / lora_B per adapted module (PEFT's module path inside the base model), and the copies of base
    weights PEFT saves next to them (an adapted lm_head or embedding: `<module>.base_layer.weight`)."""
    if not path.is_file():
        raise ConversionError(f"{path}: not found; expected the adapter's weights in safetensors")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    base_copies: dict[str, torch.Tensor] = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            name = key.removeprefix(PEFT_PREFIX)
            if name.endswith(BASE_COPY):
                base_copies[name.removesuffix(BASE_COPY) + ".weight"] = f.get_tensor(key)
                continue
            match = LORA_WEIGHT.match(name)
            if match is None:
                what = "LoRA on embeddings" if "lora_embedding_" in key else "not a lora_A/lora_B weight"
                raise ConversionError(f"{path}: tensor {key!r}: {what}; a llama.cpp LoRA adapter cannot express it")
            pairs.setdefault(match["module"], {})[match["part"]] = f.get_tensor(key)
    if not pairs:
        raise ConversionError(f"{path}: holds no LoRA weights")
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ConversionError(f"{path}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
    return pairs, base_copies


def _check_base_copies(copies: dict[str, torch.Tensor], base: dict[str, StoredTensor], source: Path) -> None:
    """A base weight the adapter carries must be the base's own (else the vocabulary was resized: not LoRA)."""
    for name, copy in copies.items():
        stored = base.get(name)
        if stored is None or tuple(copy.shape) != stored.shape or not torch.equal(
            copy.to(torch.float32), stored.read().to(torch.float32)
        ):
            raise ConversionError(
                f"{source}: the adapter carries its own {name} that differs from the base model's (a resized "
                "vocabulary?); a llama.cpp LoRA adapter cannot express it"
            )


def _plan(
    pairs: dict[str, dict[str, torch.Tensor]],
    settings: LoraSettings,
    alpha: float,
    cfg: ModelConfig,
    base: dict[str, StoredTensor],
    adapter_dir: Path,
    out_type: str,
) -> tuple[list[PlannedTensor], list[int], int]:
    """The lora_a / lora_b tensors in file order, with each module's scale and Q/K permutation applied."""
    source = adapter_dir / ADAPTER_WEIGHTS
    planned: list[tuple[tuple[int, str], PlannedTensor]] = []
    ranks, rescaled = [], 0
    for module, ab in pairs.items():
        name, kind, bid = _base_tensor(module, cfg, base, source)
        a, b = ab["A"], ab["B"]
        r, scale = settings.rank_and_scale(module)
        weight = base[module + ".weight"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise ConversionError(
                f"{source}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                f"{ADAPTER_CONFIG} gives it rank {r}"
            )
        if (b.shape[0], a.shape[1]) != weight.shape:
            raise ConversionError(
                f"{source}: {module} adapts a {b.shape[0]}x{a.shape[1]} weight, but the base's is "
                f"{weight.shape[0]}x{weight.shape[1]} ({weight.file}); wrong base model?"
            )
        factor = scale * r / alpha  # llama.cpp multiplies by alpha / r; PEFT by scale
        if not math.isclose(factor, 1.0, rel_tol=1e-6):  # 1 up to alpha's float32 rounding: lora_b as trained
            b = b.to(torch.float32) * factor
            rescaled += 1
        weight_type = OUT_TYPES[out_type]
        lora_a = PlannedTensor(f"{name}.lora_a", tuple(a.shape), weight_type, constant=a)
        lora_b = PlannedTensor(f"{name}.lora_b", tuple(b.shape), weight_type, constant=b)
        if cfg.spec.permute_qk and kind in (T.ATTN_Q, T.ATTN_K):
            lora_b.permute_heads = cfg.n_heads if kind == T.ATTN_Q else cfg.n_kv_heads
        order = bid if bid is not None else cfg.n_layers
        planned += [((order, lora_a.name), lora_a), ((order, lora_b.name), lora_b)]
        ranks.append(r)
    return [t for _, t in sorted(planned, key=lambda item: item[0])], ranks, rescaled


def _base_tensor(
    module: str, cfg: ModelConfig, base: dict[str, StoredTensor], source: Path
) -> tuple[str, gguf.MODEL_TENSOR, int | None]:
    """The GGUF name, kind and layer of the base weight a LoRA module adapts (the converter's own tables)."""
    spec = cfg.spec
    hf_name = module + ".weight"
    name = _text_model_name(hf_name, spec.text_prefixes, spec.skip_prefixes)
    if name is None:
        raise ConversionError(f"{source}: LoRA on {module!r}, which is not part of the text model's GGUF")
    path = name.removesuffix(".weight")
    match = BLOCK_NAME.match(path)
    bid = int(match.group(1)) if match else None
    kind = spec.block_tensors.get(match.group(2)) if match else GLOBAL_TENSORS.get(path)
    if kind == T.OUTPUT and (cfg.tie_word_embeddings or not spec.has_output_tensor):
        raise ConversionError(
            f"{source}: LoRA on {module!r}, but the GGUF has no output tensor (llama.cpp reuses the token "
            "embedding), so the adapter cannot be applied to the output alone"
        )
    if hf_name not in base:
        raise ConversionError(f"{source}: LoRA on {module!r}, which has no weight in the base model; wrong base?")
    if kind is None or kind == T.TOKEN_EMBD or len(base[hf_name].shape) != 2:
        raise ConversionError(
            f"{source}: LoRA on {module!r}, which is not a linear layer of the {spec.arch_name} GGUF "
            "(llama.cpp applies LoRA to linear layers)"
        )
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight", kind, bid


def _write(
    path: Path, arch: str, general: dict[str, MetadataValue], alpha: float, tensors: list[PlannedTensor]
) -> None:
    writer = gguf.GGUFWriter(path, arch)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for key, value in general.items():
            writer.add_key_value(key, value, *_value_type(value))
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, t.numpy_dtype, t.nbytes, raw_dtype=t.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(t.numpy())
    finally:
        writer.close()


def _adapter_metadata(adapter_dir: Path, metadata: dict[str, MetadataValue]) -> dict[str, MetadataValue]:
    """The caller's metadata keyed by full GGUF key (as the converter takes it), minus the adapter format's own."""
    keyed = _general_metadata(adapter_dir, metadata)
    taken = sorted(k for k in keyed if k in ADAPTER_KEYS or k.startswith(ADAPTER_PREFIX))
    if taken:
        raise ConversionError(f"metadata keys {taken} are written by the adapter converter itself; leave them out")
    return keyed
