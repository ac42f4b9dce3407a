"""Resume points in the stage's work folder, written atomically.

A checkpoint is a folder `step-NNNNNNN/` holding the trainable weights (`trainable.safetensors`) and
everything else a bit-identical continuation needs (`state.pt`: optimizer, scheduler, grad scaler, RNG
states of python/numpy/torch, loop counters). It is written under a temporary name, synced, then renamed:
a folder with the final name is always complete, so a kill during a write leaves the previous one as the
latest.

With several processes every rank takes part in a save (FSDP shards are gathered) but only rank 0 writes;
the files hold whole tensors and the optimizer state in the 1-process layout, so any number of processes
can resume from them.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from forge.train.distributed import full, full_state, load_into, shard_optimizer_state
from forge.train.rng import rng_state, set_rng_state

NAME = re.compile(r"^step-(\d{7})$")
TMP_PREFIX = ".tmp-"


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, detached on the CPU (whole: FSDP shards are gathered)."""
    return {n: full(p).cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    progress: dict[str, Any],
    keep: int = 1,
    write: bool = True,
) -> Path:
    """Write the checkpoint of `step` atomically and drop all but the newest `keep`.

    write=False (ranks > 0): only take part in gathering sharded tensors; nothing is written.
    """
    weights = trainable_tensors(model)
    optimizer_state = full_state(optimizer.state_dict())
    final = root / f"step-{step:07d}"
    if not write:
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{step:07d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    save_file(weights, str(tmp / "trainable.safetensors"))
    torch.save(
        {
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(),
            "progress": progress,
        },
        tmp / "state.pt",
    )
    for name in ("trainable.safetensors", "state.pt"):
        _fsync(tmp / name)
    if final.exists():  # a run resumed from before this step wrote it again: same content by construction
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    for old in checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are not checkpoints)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and NAME.match(p.name)]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint; leftovers of interrupted writes are removed on the way."""
    if root.is_dir():
        for leftover in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
    found = checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler, scaler and RNG states from `path`; returns the loop counters."""
    saved = load_file(str(path / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if saved.keys() != params.keys():
        missing, extra = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
        raise ValueError(
            f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {extra[:3]}); "
            f"delete {path.parent} to start over"
        )
    with torch.no_grad():
        for name, tensor in saved.items():
            load_into(params[name], tensor)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    shard_optimizer_state(optimizer)
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state["progress"]
