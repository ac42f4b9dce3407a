"""Loss curves of Forge's patched path and of plain transformers + PEFT: LoRA on SmolLM2-135M, same data, same seed.

    python bench/loss_curves.py                # SmolLM2-135M's architecture, random init (nothing downloaded)
    python bench/loss_curves.py --model DIR    # an HF folder: its weights if it has *.safetensors, else its config

Both runs: bf16 weights, fp32 LoRA masters (r 16, alpha 32, every linear layer, dropout 0), bf16 autocast,
AdamW, gradient accumulation 2 with the loss normalized over the whole accumulated batch, grad-norm clip 1,
on packed rows of a synthetic corpus that a model can learn (a fixed random bigram language), with
forge.data's block-causal masks and prompt masking. Forge's run patches the model
(`forge.models.patching.patch_for_training`) and takes its loss from `forge.models.loss.causal_lm_loss`;
the reference calls the PEFT model with labels and ``num_items_in_batch`` as transformers' Trainer does.

Prints both curves, tokens/s and peak memory of each run, and one ``RESULT {...}`` line; exits 1 when the
largest per-step relative difference of the losses is 2% or more (the acceptance criterion).
Needs a CUDA GPU and forge installed (``pip install --no-deps --no-build-isolation -e .``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from forge.data.shards import IGNORE_INDEX, collate
from forge.models.loss import causal_lm_loss
from forge.models.patching import patch_for_training
from forge.pipeline import versions

# SmolLM2-135M(-Instruct)'s config.json, as tests/conftest.py's smollm2_hf_dir fixture writes it.
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    hidden_act="silu",
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
MAX_REL_DIFF = 0.02
LANGUAGE_TOKENS = 2000  # the synthetic corpus uses this many distinct token ids
SUCCESSORS = 4  # each token is followed by one of this many tokens, with fixed probabilities


def synthetic_batches(vocab: int, steps: int, accum: int, rows: int, row_len: int, seed: int) -> list[list[dict]]:
    """steps x accum micro-batches of `rows` packed rows of `row_len` tokens from a random bigram language:
    examples of 32..256 tokens, position ids restarting per example, the first quarter of each masked."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(vocab - 10, generator=gen)[:LANGUAGE_TOKENS] + 10  # skip the special ids
    nxt = torch.randint(0, LANGUAGE_TOKENS, (LANGUAGE_TOKENS, SUCCESSORS), generator=gen)
    probs = torch.tensor([0.55, 0.25, 0.15, 0.05])

    table = nxt.tolist()

    def example(n: int) -> dict[str, torch.Tensor]:
        choices = torch.multinomial(probs, n, replacement=True, generator=gen).tolist()
        state = int(torch.randint(0, LANGUAGE_TOKENS, (1,), generator=gen))
        seq = []
        for choice in choices:
            seq.append(state)
            state = table[state][choice]
        x = ids[torch.tensor(seq)]
        y = x.clone()
        y[: n // 4] = IGNORE_INDEX
        return {"input_ids": x, "labels": y, "position_ids": torch.arange(n)}

    def row() -> dict[str, torch.Tensor]:
        parts, used = [], 0
        while used < row_len:
            n = min(int(torch.randint(32, 257, (1,), generator=gen)), row_len - used)
            parts.append(example(n))
            used += n
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    return [[collate([row() for _ in range(rows)], pad_id=0) for _ in range(accum)] for _ in range(steps)]


def targets(batch: dict[str, torch.Tensor]) -> int:
    """Target tokens of a micro-batch: labelled, not the first of an example (as causal_lm_loss counts)."""
    labels = batch["labels"].masked_fill(batch["position_ids"] == 0, IGNORE_INDEX)
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def reference_loss(model, batch: dict[str, torch.Tensor], normalizer: int) -> torch.Tensor:
    """Plain transformers + PEFT: labels (first token of each example masked) and num_items_in_batch."""
    mask = batch["attention_mask"].cuda()
    additive = torch.zeros(mask.shape, dtype=torch.bfloat16, device="cuda").masked_fill_(
        ~mask, torch.finfo(torch.bfloat16).min
    )
    labels = batch["labels"].masked_fill(batch["position_ids"] == 0, IGNORE_INDEX)
    return model(
        input_ids=batch["input_ids"].cuda(),
        attention_mask=additive,
        position_ids=batch["position_ids"].cuda(),
        labels=labels.cuda(),
        num_items_in_batch=normalizer,
        use_cache=False,
    ).loss


def load(model_dir: Path | None, seed: int) -> torch.nn.Module:
    """The base model in bf16 on the GPU: given weights, or a random init (same seed, same weights)."""
    torch.manual_seed(seed)
    if model_dir is not None and any(model_dir.glob("*.safetensors")):
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    config = AutoConfig.from_pretrained(model_dir) if model_dir is not None else LlamaConfig(**SMOLLM2_135M)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda()


def train(forge: bool, args, batches) -> dict:
    """One run of args.steps optimizer steps; returns its per-step losses, speed and peak memory."""
    base = load(args.model, args.seed)
    base.config.use_cache = False
    torch.manual_seed(args.seed + 1)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    if forge:
        patch_for_training(model, log=print)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    torch.cuda.reset_peak_memory_stats()
    losses, started = [], 0.0
    for step, micro_batches in enumerate(batches):
        if step == 1:  # the first step compiles the kernels: timing starts after it
            torch.cuda.synchronize()
            started = time.perf_counter()
        n = sum(targets(b) for b in micro_batches)
        total = 0.0
        for batch in micro_batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = causal_lm_loss(model, batch, n) if forge else reference_loss(model, batch, n)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    torch.cuda.synchronize()
    timed_tokens = sum(b["input_ids"].numel() for micro in batches[1:] for b in micro)
    return {
        "losses": losses,
        "tokens_per_s": round(timed_tokens / (time.perf_counter() - started), 1),
        "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="HF folder (weights, or config.json only)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rows", type=int, default=8, help="packed rows per micro-batch")
    parser.add_argument("--row-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps: at least 2 (the first step is not timed)")
    if not torch.cuda.is_available():
        print("RESULT " + json.dumps({"skipped": "no CUDA device"}))
        return 1

    vocab = AutoConfig.from_pretrained(args.model).vocab_size if args.model else SMOLLM2_135M["vocab_size"]
    batches = synthetic_batches(vocab, args.steps, 2, args.rows, args.row_len, args.seed)
    hf = train(False, args, batches)
    forge = train(True, args, batches)

    diffs = [abs(f - h) / h for f, h in zip(forge["losses"], hf["losses"], strict=True)]
    print(f"{'step':>4}  {'hf+peft':>9}  {'forge':>9}  {'rel diff':>8}")
    for step, (h, f, d) in enumerate(zip(hf["losses"], forge["losses"], diffs, strict=True), start=1):
        print(f"{step:>4}  {h:9.4f}  {f:9.4f}  {d:8.2%}")
    for name, run in (("hf+peft", hf), ("forge", forge)):
        print(f"{name}: {run['tokens_per_s']:,.0f} tokens/s, peak {run['peak_mib']:,.0f} MiB")
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    result = {
        "model": str(args.model) if args.model else "SmolLM2-135M config, random init",
        "device": torch.cuda.get_device_name(),
        "versions": versions(),
        "steps": args.steps,
        "tokens_per_step": 2 * args.rows * args.row_len,
        "max_rel_diff": diffs[worst],
        "max_rel_diff_step": worst + 1,
        "passed": diffs[worst] < MAX_REL_DIFF,
        "hf_peft": hf,
        "forge": forge,
    }
    print("RESULT " + json.dumps(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
