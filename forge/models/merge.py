"""Merge a PEFT LoRA adapter into its base weights, one tensor at a time: W' = W + scale * B @ A in fp32."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from forge.models.safetensors_stream import write_streaming

PEFT_PREFIX = "base_model.model."
NF4_PARTS = (
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    "quant_state.bitsandbytes__nf4",
    "quant_state.bitsandbytes__fp4",
)
COPY_FILES = ("config.json", "generation_config.json")


class MergeError(ValueError):
    """The adapter does not fit the base (a key, a shape or an unsupported option); the message names it."""


@dataclass
class LoraWeights:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float


def read_adapter(adapter_dir: Path) -> dict[str, LoraWeights]:
    """The adapter's LoRA pairs keyed by the base weight they modify (e.g. 'model.layers.0.mlp.up_proj.weight')."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{adapter_dir}/adapter_config.json: peft_type {config['peft_type']} is not LORA")
    if config.get("fan_in_fan_out"):
        raise MergeError(f"{adapter_dir}/adapter_config.json: fan_in_fan_out adapters are not supported")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            module, sep, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            if not sep or part not in ("A.weight", "B.weight"):
                raise MergeError(f"{adapter_dir}/adapter_model.safetensors: cannot merge tensor {key}")
            pairs.setdefault(module, {})[part[0]] = f.get_tensor(key)
    merged = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise MergeError(f"{adapter_dir}: {module} has lora_{''.join(ab)} but not both A and B")
        short = module.rsplit(".", 1)[-1]
        r = _pattern(config.get("rank_pattern") or {}, module, short, config["r"])
        alpha = _pattern(config.get("alpha_pattern") or {}, module, short, config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        merged[module + ".weight"] = LoraWeights(ab["A"], ab["B"], scale)
    return merged


def _pattern(patterns: dict[str, float], module: str, short: str, default: float) -> float:
    for key, value in patterns.items():
        if module == key or module.endswith("." + key) or short == key:
            return value
    return default


def merge_into(base_dir: Path, adapter_dir: Path, out_dir: Path) -> dict:
    """Write out_dir: base_dir's HF folder with the adapter merged in (4-bit bases are dequantized first).

    Streams shard by shard and tensor by tensor, so peak memory is about one weight matrix in fp32.
    """
    lora = read_adapter(adapter_dir)
    config = json.loads((base_dir / "config.json").read_text())
    quant = config.pop("quantization_config", None)
    nf4 = bool(quant and quant.get("quant_method") == "bitsandbytes" and quant.get("load_in_4bit"))
    if quant and not nf4:
        raise MergeError(f"{base_dir}/config.json: cannot merge into a {quant.get('quant_method')} quantized base")
    shards = _shards(base_dir)
    targets = _by_checkpoint_name(base_dir, shards, lora, adapter_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    out_dtype = None
    for shard in shards:
        with safe_open(shard, "pt") as f:
            names = [k for k in f.keys() if not (nf4 and _is_nf4_part(k))]  # noqa: SIM118
            plan, produce = [], []
            for name in names:
                tensor_dtype, shape = _planned(f, name, nf4)
                out_dtype = out_dtype or (
                    tensor_dtype if tensor_dtype.is_floating_point and name.endswith("weight") else None
                )
                plan.append((name, tensor_dtype, shape))
                produce.append(name)
                weight_map[name] = shard.name
            tensors = (_merged_tensor(f, name, nf4, targets) for name in produce)
            write_streaming(out_dir / shard.name, plan, tensors)
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if nf4:
        config["dtype"] = str(out_dtype).replace("torch.", "")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    copy_side_files(base_dir, out_dir, skip=("config.json",))
    return {
        "merged_modules": len(targets),
        "dequantized_nf4": nf4,
        "dtype": config.get("dtype") or config.get("torch_dtype"),
    }


def copy_side_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy everything but weights (config, tokenizer, chat template, generation config) from src to dst."""
    for path in src.iterdir():
        if path.is_file() and path.name not in skip and not path.name.startswith("model") and path.suffix != ".bin":
            shutil.copyfile(path, dst / path.name)


def _by_checkpoint_name(
    base_dir: Path, shards: list[Path], lora: dict[str, LoraWeights], adapter_dir: Path
) -> dict[str, LoraWeights]:
    """The adapter's pairs keyed by the base checkpoint's tensor names.

    PEFT names weights as the loaded model does. transformers renames some checkpoints' keys on load (Gemma 3
    image-text checkpoints store language_model.model.* for the model's model.language_model.*); where the names
    differ, they are mapped with transformers' own renaming rules for the model class.
    """
    names: set[str] = set()
    for shard in shards:
        with safe_open(shard, "pt") as f:
            names.update(f.keys())
    if lora.keys() <= names:
        return lora
    model_names = _model_names(base_dir, names)
    targets = {name: lora[model_name] for name, model_name in model_names.items() if model_name in lora}
    missing = sorted(set(lora) - {model_names[name] for name in targets})
    if missing:
        raise MergeError(f"{adapter_dir}: adapter weights for {missing[0]} have no matching base weight")
    return targets


def _model_names(base_dir: Path, names: set[str]) -> dict[str, str]:
    """Checkpoint tensor name -> the loaded model's name for it, for names transformers renames without
    changing the tensor (an empty map when the model class cannot be built here)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    try:
        config = AutoConfig.from_pretrained(base_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError):
        return {}
    rules = get_model_conversion_mapping(model)
    renamings = [rule for rule in rules if isinstance(rule, WeightRenaming)]
    converters = [rule for rule in rules if not isinstance(rule, WeightRenaming)]
    params = model.state_dict()
    renamed = {}
    for name in names:
        model_name, converter = rename_source_key(name, renamings, converters, model.base_model_prefix, params)
        if converter is None:  # a converter fuses or splits tensors: no one-to-one name to merge into
            renamed[name] = model_name
    return renamed


def _shards(base_dir: Path) -> list[Path]:
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted({base_dir / v for v in json.loads(index.read_text())["weight_map"].values()})
    shards = sorted(base_dir.glob("*.safetensors"))
    if not shards:
        raise MergeError(f"{base_dir}: no safetensors weights")
    return shards


def _is_nf4_part(name: str) -> bool:
    return any(name.endswith(".weight." + part) for part in NF4_PARTS)


def _is_nf4_weight(f, name: str) -> bool:
    return name + ".absmax" in f.keys()  # noqa: SIM118


def _planned(f, name: str, nf4: bool) -> tuple[torch.dtype, tuple[int, ...]]:
    if nf4 and _is_nf4_weight(f, name):
        state = _quant_state(f, name)
        return state.dtype, tuple(state.shape)
    t = f.get_slice(name)
    return _DTYPES[t.get_dtype()], tuple(t.get_shape())


def _quant_state(f, name: str):
    from bitsandbytes.functional import QuantState

    parts = {k[len(name) + 1 :]: f.get_tensor(k) for k in f.keys() if k.startswith(name + ".")}  # noqa: SIM118
    return QuantState.from_dict(parts, device=torch.device("cpu"))


def _merged_tensor(f, name: str, nf4: bool, lora: dict[str, LoraWeights]) -> torch.Tensor:
    if nf4 and _is_nf4_weight(f, name):
        from bitsandbytes.functional import dequantize_4bit

        state = _quant_state(f, name)
        weight = dequantize_4bit(f.get_tensor(name), state).to(state.dtype)
    else:
        weight = f.get_tensor(name)
    pair = lora.get(name)
    if pair is None:
        return weight
    expected = (pair.b.shape[0], pair.a.shape[1])
    if tuple(weight.shape) != expected:
        raise MergeError(f"adapter for {name} is {expected}, base weight is {tuple(weight.shape)}")
    merged = weight.float() + pair.scale * (pair.b.float() @ pair.a.float())
    return merged.to(weight.dtype)


_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I32": torch.int32,
    "I64": torch.int64,
}
