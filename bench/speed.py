"""Forge's side of the speed benchmark: LoRA / QLoRA training steps on a random-init model of a real shape.

    python bench/speed.py make --shape llama8b --out /tmp/model-llama8b       # or reuse the peers' model
    python bench/speed.py run --model /tmp/model-llama8b --bits 16 --checkpointing offload --system forge

It measures what the peers' recipe (`../shared/bench-peers/peers_bench.py`) measures, on the same terms:
LoRA r 16 (alpha 16) on q/k/v/o/gate/up/down, bf16, AdamW lr 1e-4, the same four random batches of
bs x seq tokens (generator seed 0, labels = inputs), 2 warm-up steps, then timed steps; peak memory is
CUDA's peak allocation over the timed steps, weights included. The model is loaded, patched and stepped by
Forge's own training code (`forge.train.model.load_model`, `forge.train.recompute`, `forge.train.loop.train_step`,
which also clips the gradient norm as the train stage does). Batches carry ``input_ids`` and ``labels``
only, as the peers' recipe gives its systems. Prints one ``RESULT {json}`` line; with ``--profile`` also the
top CUDA kernels of one step and their share of its time, and the top non-GEMM operators by input shapes
(``--trace FILE``: that step's chrome trace).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

SHAPES = {
    "llama8b": dict(
        arch="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
    ),
    "qwen7b": dict(
        arch="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
    ),
    "llama1b": dict(
        arch="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "tiny": dict(  # for checking the script on a CPU
        arch="llama",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make(out: Path, shape: str) -> None:
    """A random-init bf16 checkpoint of `shape` with a word-level tokenizer, as the peers' recipe makes one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("arch"), **spec, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(out)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    ).save_pretrained(out)
    print("made", out)


def top_kernels(prof, step_ms: float, n: int = 25) -> list[dict]:
    """The n CUDA kernels with the most device time in the profiled step, with their share of the step; the
    first row sums every kernel (what is left of the step is the GPU waiting)."""
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if device_us > 0 and event.device_type == torch.autograd.DeviceType.CUDA:
            rows.append({"kernel": event.key[:90], "ms": round(device_us / 1000, 2), "calls": event.count})
    rows.sort(key=lambda r: -r["ms"])
    total_ms, calls = round(sum(r["ms"] for r in rows), 2), sum(r["calls"] for r in rows)
    total = {"kernel": "all kernels", "ms": total_ms, "calls": calls}
    rows = [total, *rows[:n]]
    for r in rows:
        r["share"] = round(r["ms"] / step_ms, 3)
    return rows


def top_ops(prof, n: int = 30) -> list[dict]:
    """The n elementwise/copy operators (by input shapes) with the most device time in the profiled step, and
    the host time of the whole step's operators: where the non-GEMM time comes from."""
    rows = []
    for event in prof.key_averages(group_by_input_shape=True):
        device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if event.key.startswith("aten::") and device_us > 0 and not any(k in event.key for k in ("mm", "attention")):
            shapes = str(event.input_shapes)[:120]
            rows.append({"op": event.key, "shapes": shapes, "ms": round(device_us / 1000, 2), "calls": event.count})
    rows.sort(key=lambda r: -r["ms"])
    return rows[:n]


def profiled(step, sync, trace: str | None):
    """The torch profiler's record of one step (CPU and CUDA), its chrome trace written to `trace` if given."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step()
        sync()
    if trace:
        prof.export_chrome_trace(trace)
    return prof


def run(args: argparse.Namespace) -> dict:
    from forge.config import TrainConfig
    from forge.pipeline import versions
    from forge.train.loop import step_copies, train_step
    from forge.train.model import load_model
    from forge.train.optim import make_optimizer
    from forge.train.precision import Precision
    from forge.train.recompute import apply_recompute, plan_for_model

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    precision = Precision("bf16" if cuda else "fp32")
    cfg = TrainConfig(
        method="qlora" if args.bits == 4 else "lora",
        lora_r=args.rank,
        lora_alpha=float(args.rank),
        target_modules=TARGETS,
        lr=1e-4,
        gradient_checkpointing=args.checkpointing,
        kernels=args.kernels,
    )
    torch.manual_seed(0)
    started = time.time()
    model = load_model(Path(args.model), cfg, precision, device, log=print)
    plan = plan_for_model(model, cfg.gradient_checkpointing, args.bs * args.seq, device, 2 if cuda else 4)
    apply_recompute(model, plan)
    print(plan.line())
    load_s = time.time() - started
    model.train()
    optimizer = make_optimizer(model, cfg)
    gen = torch.Generator(device="cpu").manual_seed(0)
    vocab = model.config.vocab_size
    batches = [torch.randint(3, vocab, (args.bs, args.seq), generator=gen) for _ in range(4)]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    weights = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = []

    def step(i: int) -> None:
        ids = batches[i % 4]
        batch = {"input_ids": ids, "labels": ids}  # what the peers' recipe gives its systems
        losses.append(train_step(model, [batch], optimizer, None, 1.0, precision, device))

    with nullcontext() if args.casts_every_forward else step_copies():  # as the training loop runs its steps
        for i in range(args.warmup):
            step(i)
        sync()
        t0 = time.time()
        for i in range(args.warmup, args.warmup + args.steps):
            step(i)
        sync()
        dt = time.time() - t0
        prof = profiled(lambda: step(0), sync, args.trace) if args.profile else None
    losses = [r.values()[0] for r in losses[: args.warmup + args.steps]]  # not the profiled step
    result = dict(
        system=args.system,
        bits=args.bits,
        bs=args.bs,
        seq=args.seq,
        rank=args.rank,
        steps=args.steps,
        tokens_per_s=round(args.bs * args.seq * args.steps / dt, 1),
        step_s=round(dt / args.steps, 4),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        weights_gib=round(weights / 2**30, 2),
        load_s=round(load_s, 1),
        first_loss=round(losses[0], 4),
        last_loss=round(losses[-1], 4),
        gpu=torch.cuda.get_device_name() if cuda else "cpu",
        checkpointing=plan.mode,
        recomputed_layers=len(plan.recompute),
        kernels=args.kernels,
        versions=versions(),
    )
    if prof is not None:
        result["profile"] = top_kernels(prof, result["step_s"] * 1000)
        result["profile_ops"] = top_ops(prof)
    print("RESULT " + json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=["make", "run"])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--shape", default="llama8b", choices=sorted(SHAPES))
    ap.add_argument("--model")
    ap.add_argument("--system", default="forge", help="the name the result row carries (forge, forge-auto, ...)")
    ap.add_argument("--bits", type=int, default=16, choices=[16, 4])
    ap.add_argument("--checkpointing", default="auto", choices=["auto", "none", "full", "offload"])
    ap.add_argument("--kernels", default="auto", choices=["auto", "off"])
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument(
        "--casts-every-forward",
        action="store_true",
        help="make the adapters' compute-dtype casts in every forward, as before session 6 (for A/B runs)",
    )
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--trace", help="with --profile: write the profiled step's chrome trace here")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a quick check of the script)")
    args = ap.parse_args()
    if args.cmd == "make":
        make(args.out, args.shape)
    else:
        run(args)


if __name__ == "__main__":
    main()
