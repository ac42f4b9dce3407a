"""Data-parallel scaling of the train stage: LoRA tokens/s on 1 GPU against N GPUs, the same batch per GPU.

    python bench/distributed.py --model /tmp/model-llama8b --gpus 1 2      # makes the model first if missing

Both runs go through the stage's launcher (`forge.train.launch.launch_training`: torchrun, one process per
GPU, so this process never touches a GPU): LoRA r 16 (alpha 16) on q/k/v/o/gate/up/down, bf16, AdamW
lr 1e-4, random token sequences of --seq tokens (every token a target), --bs sequences per GPU per step
(grad_accum = the number of GPUs, so each rank runs one micro-batch of --bs). Tokens/s is measured over the
steps after --warmup, from the stage's metrics.jsonl. Prints one ``RESULT {json}`` line per GPU count and
a final ``RESULT`` row with the speed-up. ``--shape tiny`` with CUDA hidden checks the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SPEED = Path(__file__).with_name("speed.py")  # makes the random-init model; its shapes and LoRA targets
sys.path.insert(0, str(SPEED.parent))
from speed import SHAPES, TARGETS  # noqa: E402

from forge.config import TrainConfig  # noqa: E402
from forge.data.shards import IGNORE_INDEX, Example, build_split, save_split  # noqa: E402
from forge.train.launch import launch_training  # noqa: E402
from forge.train.metrics import read_metrics  # noqa: E402


def write_data(folder: Path, sequences: int, seq: int, vocab: int) -> Path:
    """Random token sequences, all trained on; an eval split without targets (no eval in the timing)."""
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, vocab, (seq,), generator=gen).tolist() for _ in range(sequences)]
    folder.mkdir(parents=True, exist_ok=True)
    save_split(build_split([[Example(ids, ids)] for ids in rows]), folder / "train.safetensors")
    save_split(build_split([[Example(rows[0], [IGNORE_INDEX] * seq)]]), folder / "eval.safetensors")
    return folder


def steady_tokens_per_s(metrics: Path, warmup: int) -> float:
    """Tokens per second over the steps after `warmup` (each row holds cumulative tokens and tokens/s)."""
    rows = [r for r in read_metrics(metrics) if "loss" in r]
    first, last = rows[warmup - 1], rows[-1]
    seconds = last["tokens"] / last["tokens_per_s"] - first["tokens"] / first["tokens_per_s"]
    return (last["tokens"] - first["tokens"]) / seconds


def run(model: Path, gpus: int, args: argparse.Namespace, root: Path) -> dict:
    steps = args.warmup + args.steps
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    data = write_data(root / f"data-{gpus}", args.bs * gpus * steps, args.seq, vocab)
    cfg = TrainConfig(
        method="lora", lora_r=args.rank, lora_alpha=float(args.rank), target_modules=TARGETS, lr=1e-4,
        batch_size=args.bs, grad_accum=gpus, max_steps=steps, warmup_ratio=0.0, eval_every=10**6,
        save_every=10**6, gradient_checkpointing=args.checkpointing, nproc=gpus, distributed=args.distributed,
    )  # fmt: skip
    out, work = root / f"out-{gpus}", root / f"work-{gpus}"
    out.mkdir(parents=True)
    started = time.time()
    stats = launch_training(model, data, cfg, out, work, log=print)
    row = dict(
        gpus=gpus,
        tokens_per_s=round(steady_tokens_per_s(out / "metrics.jsonl", args.warmup), 1),
        per_gpu_batch=args.bs,
        seq=args.seq,
        steps=args.steps,
        distributed=stats["distributed"],
        checkpointing=stats["activation_checkpointing"],
        kernels=stats["kernels"],
        peak_memory_mib_rank0=stats["peak_memory_mib"],
        device=stats["device"],
        wall_s=round(time.time() - started, 1),
        torch=torch.__version__,
    )
    print("RESULT " + json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="HF folder; made with --shape when missing")
    ap.add_argument("--shape", default="llama8b", choices=sorted(SHAPES))
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--distributed", default="ddp", choices=["auto", "ddp", "fsdp"])
    ap.add_argument("--checkpointing", default="auto", choices=["auto", "none", "full", "offload"])
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    if not (args.model / "config.json").is_file():  # in its own process: this one keeps no GPU memory
        make = [sys.executable, str(SPEED), "make", "--shape", args.shape, "--out", str(args.model)]
        subprocess.run(make, check=True)
    root = Path(tempfile.mkdtemp(prefix="forge-bench-dist-"))
    try:
        rows = [run(args.model, n, args, root) for n in args.gpus]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = rows[0]["tokens_per_s"]
    speedup = {r["gpus"]: round(r["tokens_per_s"] / base, 3) for r in rows}
    print("RESULT " + json.dumps({"speedup_over_" + str(rows[0]["gpus"]): speedup, "rows": rows}), flush=True)


if __name__ == "__main__":
    main()
