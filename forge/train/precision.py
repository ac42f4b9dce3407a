"""Compute precision: which dtype the forward runs in, by the device's capability or the config."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """A compute precision: its name, the dtype of the frozen weights and of autocast."""

    name: str  # bf16 | fp16 | fp32

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 and fp32 do not."""
        return self.name == "fp16"

    def autocast(self, device: torch.device) -> AbstractContextManager:
        """The autocast context of the forward pass (a no-op in fp32)."""
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.name != "fp32")


def choose_precision(setting: str, device: torch.device) -> Precision:
    """auto: bf16 on GPUs that support it, else fp16; fp32 on CPU. An explicit choice is checked."""
    if setting == "auto":
        if device.type != "cuda":
            return Precision("fp32")
        return Precision("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if setting == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("train.precision=bf16: this GPU has no bfloat16 support; use fp16 or auto")
    return Precision(setting)


def pick_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
