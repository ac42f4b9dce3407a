"""What the train stage leaves behind: the adapter (or full model), logs, loss curve and stats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from forge.train.metrics import METRICS_FILE, TB_DIR, plot_losses, read_metrics

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
STATS_FILE = "train_stats.json"
LOSS_PNG = "loss.png"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def save_adapter(model: torch.nn.Module, out: Path, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """The PEFT adapter folder: adapter_config.json + adapter_model.safetensors.

    weights: the trainable tensors by name when the model's own are shards (FSDP).
    """
    folder = out / ADAPTER_DIR
    model.save_pretrained(str(folder), safe_serialization=True, **({"state_dict": weights} if weights else {}))
    return folder


def base_dtype(base_dir: Path) -> torch.dtype:
    """The dtype the base checkpoint was stored in (config.json's dtype / torch_dtype), fp32 if unsaid."""
    config = json.loads((base_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPE_NAMES.get(str(name), torch.float32)


def save_full_model(
    model: torch.nn.Module, base_dir: Path, out: Path, weights: dict[str, torch.Tensor] | None = None
) -> Path:
    """A full fine-tune as an HF folder in the base's dtype, with the base's tokenizer files beside it.

    weights: the whole state dict when the model's own tensors are shards (FSDP).
    """
    folder = out / MODEL_DIR
    dtype = base_dtype(base_dir)
    if weights is None:
        model.to(dtype).save_pretrained(str(folder), safe_serialization=True)
    else:
        weights = {k: v.to(dtype) for k, v in weights.items()}
        model.save_pretrained(str(folder), safe_serialization=True, state_dict=weights)
    for path in sorted(base_dir.iterdir()):
        target = folder / path.name
        if path.is_file() and not target.exists() and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, target)
    return folder


def save_logs(work: Path, out: Path) -> None:
    """Copy metrics.jsonl and the TensorBoard events from the work folder and draw loss.png."""
    shutil.copy2(work / METRICS_FILE, out / METRICS_FILE)
    if (work / TB_DIR).is_dir():
        shutil.copytree(work / TB_DIR, out / TB_DIR)
    plot_losses(read_metrics(out / METRICS_FILE), out / LOSS_PNG)


def save_stats(stats: dict[str, Any], out: Path) -> None:
    (out / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
