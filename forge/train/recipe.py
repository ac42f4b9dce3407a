"""The train stage's recipe: data and base in, adapter (or full weights) with logs and stats out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from forge.config import TrainConfig
from forge.data.shards import TokenSplit, load_split
from forge.train.batches import sequence_length
from forge.train.checkpoint import trainable_tensors
from forge.train.distributed import SINGLE, Parallel, agree, choose_mode, full_state, wrap
from forge.train.loop import train_loop
from forge.train.memory import peak_memory
from forge.train.model import kernels_choice, load_model, pad_token_id, trainable_count
from forge.train.output import save_adapter, save_full_model, save_logs, save_stats
from forge.train.precision import choose_precision, pick_device
from forge.train.recompute import apply_recompute, plan_for_model
from forge.train.rng import seed_everything

TRAIN_SPLIT = "train.safetensors"
EVAL_SPLIT = "eval.safetensors"


def read_split(path: Path) -> TokenSplit:
    """A split written by the data stage, with a clear error when it is missing or unreadable."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split not found (the data stage writes it)")
    try:
        return load_split(path)
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise ValueError(f"{path}: not a readable token split ({exc})") from exc


def run_training(
    base_dir: Path,
    data_dir: Path,
    cfg: TrainConfig,
    out: Path,
    work: Path,
    log: Callable[[str], None] = print,
    run_id: str = "",
    show_progress: bool = True,
    parallel: Parallel = SINGLE,
) -> dict[str, Any]:
    """Fine-tune the HF model in base_dir on data_dir's splits; write outputs into `out`, checkpoints into
    `work` (resuming from them). Returns the stats written to train_stats.json plus a one-line summary.

    Under torchrun (`parallel` from `distributed.start()`) every rank calls this; rank 0 alone writes and
    returns the stats, the others return an empty dict."""
    train_split = read_split(data_dir / TRAIN_SPLIT)
    eval_split = read_split(data_dir / EVAL_SPLIT)
    if len(train_split) == 0:
        raise ValueError(f"{data_dir / TRAIN_SPLIT}: the training split holds no sequences")
    device = parallel.device or pick_device()
    precision = choose_precision(cfg.precision, device)
    mode = "single"
    if parallel.world > 1:
        mode, why = agree(choose_mode(cfg.distributed, cfg.method, base_dir, device, precision.dtype))
        log(f"distributed: {mode} over {parallel.world} processes ({why})")

    seed_everything(cfg.seed)  # before the adapters are initialised: the same on every rank
    model = load_model(base_dir, cfg, precision, device, log, torch.device("cpu") if mode == "fsdp" else None)
    trainable, total = trainable_count(model)
    log(f"{cfg.method}: {trainable:,} trainable parameters of {total:,}; {precision.name} on {device}")

    longest = max(sequence_length(train_split, i) for i in range(len(train_split)))
    act_bytes = torch.finfo(precision.dtype).bits // 8
    plan = plan_for_model(model, cfg.gradient_checkpointing, cfg.batch_size * longest, device, act_bytes)
    apply_recompute(model, plan)
    log(plan.line())
    if mode != "single":
        parallel = wrap(model, parallel, mode)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    state = train_loop(
        model,
        train_split,
        eval_split,
        cfg,
        precision=precision,
        device=device,
        pad_id=pad_token_id(model),
        work=work,
        log=log,
        run_id=run_id,
        show_progress=show_progress,
        parallel=parallel,
    )

    if cfg.method == "full":  # under FSDP every rank gathers the shards, rank 0 writes
        weights = full_state(model.state_dict()) if mode == "fsdp" else None
        if parallel.is_main:
            save_full_model(model, base_dir, out, weights)
    else:
        weights = trainable_tensors(model) if mode == "fsdp" else None
        if parallel.is_main:
            save_adapter(model, out, weights)
    if not parallel.is_main:
        return {}
    save_logs(work, out)
    peak_mib, peak_kind = peak_memory()
    stats = {
        "method": cfg.method,
        "steps": state.step,
        "total_steps": state.total_steps,
        "early_stopped": state.early_stopped,
        "resumed_from_step": state.resumed_from,
        "tokens": state.tokens,
        "target_tokens": state.target_tokens,
        "train_loss": state.train_loss,
        "initial_eval_loss": state.initial_eval_loss,
        "eval_loss": state.eval_loss,
        "best_eval_loss": state.best_eval_loss,
        "tokens_per_s": round(state.tokens_per_s, 1),
        "train_seconds": round(state.train_seconds, 2),
        "peak_memory_mib": round(peak_mib, 1),
        "peak_memory_kind": peak_kind,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision.name,
        "trainable_parameters": trainable,
        "kernels": kernels_choice(cfg.kernels, device),
        "activation_checkpointing": plan.mode,
        "recomputed_layers": len(plan.recompute),
        "processes": parallel.world,
        "distributed": mode,
    }
    save_stats(stats, out)
    return {**stats, "line": summary_line(stats)}


def summary_line(stats: dict[str, Any]) -> str:
    """e.g. 'lora 120 steps, 81,234 tokens, eval loss 2.314 → 1.872, 640 tok/s'."""
    line = f"{stats['method']} {stats['steps']} steps, {stats['tokens']:,} tokens"
    if stats["eval_loss"] is not None:
        line += f", eval loss {stats['initial_eval_loss']:.3f} → {stats['eval_loss']:.3f}"
    elif stats["train_loss"] is not None:
        line += f", train loss {stats['train_loss']:.3f}"
    return line + f", {stats['tokens_per_s']:,.0f} tok/s"
