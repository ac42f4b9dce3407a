"""Memory: activation checkpointing by free memory, CPU offload of saved activations, peak usage."""

from __future__ import annotations

import contextlib
import resource
import sys
from contextlib import AbstractContextManager

import torch

HEADROOM = 0.8  # use at most this share of the free memory before turning checkpointing on


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory of the device (CUDA) or available RAM (CPU, Linux); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def training_bytes_estimate(model: torch.nn.Module, tokens_per_micro_batch: int, act_bytes: int) -> int:
    """Rough bytes one micro-batch needs beyond the loaded weights without checkpointing.

    Per token and decoder layer a Llama-style block keeps about 10 hidden-size and 4 intermediate-size
    activations for the backward; the logits are kept in their dtype, in fp32 for the loss, and as a
    gradient; AdamW adds a gradient and two moments (fp32) per trainable parameter.
    """
    config = model.config
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * hidden)
    per_token = config.num_hidden_layers * (10 * hidden + 4 * inter) * act_bytes
    logits = config.vocab_size * (act_bytes + 4 + 4)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return tokens_per_micro_batch * (per_token + logits) + trainable * 12


def choose_checkpointing(
    setting: str, model: torch.nn.Module, tokens_per_micro_batch: int, device: torch.device, act_bytes: int
) -> tuple[str, str]:
    """(mode, reason): mode is none, full or offload; auto turns full on when memory would run short."""
    if setting == "offload" and device.type != "cuda":
        return "none", "offload needs a GPU to offload from"
    if setting != "auto":
        return setting, f"train.gradient_checkpointing={setting}"
    need = training_bytes_estimate(model, tokens_per_micro_batch, act_bytes)
    free = free_memory_bytes(device)
    if free is None:
        return "none", "free memory unknown"
    mode = "full" if need > HEADROOM * free else "none"
    return mode, f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in the backward instead of keeping its activations."""
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(hf_model, "activation_checkpointing_enable"):  # transformers >= 5.20
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def activation_offload(mode: str, device: torch.device) -> AbstractContextManager:
    """The context a forward+backward runs in: tensors saved for the backward live in pinned CPU memory
    with `offload`, on the device otherwise."""
    if mode == "offload":
        return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
    return contextlib.nullcontext()


def peak_memory() -> tuple[float, str]:
    """(peak MiB, what was measured): CUDA's peak allocation when on GPU, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process_peak_rss"
