"""Pre-flight checks: what would make a run fail after hours of training, found before it starts.

Each check is one function returning a `Check` (ok, or a one-line failure that says the fix). `forge run`
runs them before the first expensive stage (train, merge, gguf, quantize) that is not cached, skipping the
checks whose stages are all cached; `forge check` runs them all.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge.config import ForgeConfig, LoadedConfig
from forge.pipeline import Pipeline

EXPENSIVE = ("train", "merge", "gguf", "quantize")
# The stages each check protects: in `forge run` a check is skipped when none of them will run.
GUARDS: dict[str, tuple[str, ...]] = {
    "architecture": ("gguf", "quantize"),
    "vocabulary": ("train", "gguf"),
    "double BOS": ("data", "train"),
    "chat template": ("data", "train"),
    "disk": EXPENSIVE,
    "merge memory": ("merge",),
}
# Bits per weight of the GGUF types (llama.cpp's block layouts; k-quant mixes as measured on Llama shapes).
BITS_PER_WEIGHT = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q6_k": 6.5625, "q5_k_m": 5.69,
                   "q4_k_m": 4.89, "q4_0": 4.5}
EMBEDDING_BITS = 8.5  # k-quant mixes keep the token embedding / output matrix at q6_k..q8_0
DISK_MARGIN = 1.10  # on top of the estimate: metadata, tokenizer files, block padding
MERGE_BASELINE = 1 << 30  # Python, torch and the process around the merge
CONVERSATION_FORMATS = ("messages", "sharegpt", "alpaca")


class PreflightError(RuntimeError):
    """At least one pre-flight check failed; the message is the first failure (all are logged)."""


@dataclass(frozen=True)
class Check:
    """One check's outcome: ok, failed (message says the fix) or skipped (message says why)."""

    name: str
    ok: bool
    message: str
    skipped: bool = False


@dataclass(frozen=True)
class Weights:
    """What the safetensors headers of a model folder say about its tensors."""

    params: int
    bytes: int
    largest: int  # elements of the largest tensor
    largest_bytes: int  # bytes of the largest tensor
    embedding_params: int  # token embedding and output matrices
    linear_shapes: dict[str, tuple[int, int]]  # 2-D weights inside the transformer blocks (LoRA targets)


def check_architecture(config: dict[str, Any]) -> Check:
    """The GGUF converter has a table for the model's architecture class."""
    from forge.converters import SUPPORTED_ARCHITECTURES

    arch = (config.get("architectures") or [config.get("model_type", "?")])[0]
    if arch in SUPPORTED_ARCHITECTURES:
        return Check("architecture", True, f"{arch} is supported by the GGUF converter")
    return Check(
        "architecture", False,
        f"{arch} is not supported by the GGUF converter (supported: {', '.join(SUPPORTED_ARCHITECTURES)}); "
        "pick a base model of a supported architecture, or run only up to --to merge",
    )


def check_vocabulary(tokenizer: Any, config: dict[str, Any]) -> Check:
    """Every token id the tokenizer can produce has an embedding row."""
    rows = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    size = len(tokenizer)
    if rows is None:
        return Check("vocabulary", False, "config.json has no vocab_size; cannot tell the embedding rows")
    if size <= rows:
        return Check("vocabulary", True, f"tokenizer has {size:,} tokens, the embedding {rows:,} rows")
    return Check(
        "vocabulary", False,
        f"tokenizer has {size:,} tokens but the embedding only {rows:,} rows (ids {rows:,}+ would index past "
        "it): resize the embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer)), padded "
        "to a multiple of 64) and save the base model, or remove the added tokens from the tokenizer",
    )


def check_double_bos(tokenizer: Any) -> Check:
    """The token stream the data stage builds from the chat template starts with at most one BOS.

    Rendered and tokenized by the data stage's own code, which tokenizes templated text with
    add_special_tokens=False, so a template
    that writes BOS while the tokenizer also adds one (Llama 3, Gemma) still gives one BOS; two come from a
    template that writes BOS twice (e.g. once up front and again before the first turn).
    """
    bos = tokenizer.bos_token_id
    if not getattr(tokenizer, "chat_template", None):
        return Check("double BOS", True, "no chat template", skipped=True)
    if bos is None:
        return Check("double BOS", True, "the tokenizer has no BOS token")
    from forge.data import DataError
    from forge.data.encoding import encode
    from forge.data.templating import render_chat

    conversation = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
    try:  # the data stage's own rendering and tokenization
        rendered = render_chat(tokenizer, conversation, "responses", "a user/assistant conversation")
        ids = encode(tokenizer, [rendered])[0].input_ids
    except DataError as exc:
        return Check("double BOS", False, str(exc))
    leading = next((i for i, t in enumerate(ids) if t != bos), len(ids))
    if leading >= 2:
        return Check(
            "double BOS", False,
            f"the chat template writes BOS {tokenizer.bos_token!r} {leading} times at the start; training "
            "would see a doubled BOS that inference never has: remove the extra {{ bos_token }} from the "
            "template (tokenizer_config.json or chat_template.jinja of the base model)",
        )
    if not leading:
        return Check("double BOS", True, "the chat template writes no BOS")
    if tokenizer("x")["input_ids"][:1] == [bos]:
        return Check(
            "double BOS", True,
            "one BOS: the template writes it and the tokenizer would add another, but templated text is "
            "tokenized without added special tokens",
        )
    return Check("double BOS", True, "one BOS, written by the chat template")


def check_chat_template(tokenizer: Any, conversational: bool) -> Check:
    """A conversational dataset needs the base tokenizer's chat template."""
    if not conversational:
        return Check("chat template", True, "the dataset is plain text", skipped=True)
    if getattr(tokenizer, "chat_template", None):
        return Check("chat template", True, "the base tokenizer has a chat template")
    return Check(
        "chat template", False,
        "the dataset holds conversations but the base tokenizer has no chat template: use an instruct/chat "
        "base model, add a chat_template to its tokenizer_config.json, or set data.format=text",
    )


def check_disk(needed: dict[str, int], free_bytes: int, where: Path) -> Check:
    """The planned outputs (by stage, in bytes) fit the free space of the run folder's filesystem."""
    total = sum(needed.values())
    detail = ", ".join(f"{name} {_gib(n)}" for name, n in needed.items()) or "nothing new"
    if total <= free_bytes:
        return Check("disk", True, f"needs about {_gib(total)} ({detail}); {_gib(free_bytes)} free at {where}")
    return Check(
        "disk", False,
        f"needs about {_gib(total)} ({detail}) but only {_gib(free_bytes)} is free at {where}: free space, "
        "set run.dir to a larger disk, or drop quants from export.quants",
    )


def check_merge_memory(needed: int, available: int) -> Check:
    """The streamed merge fits in the available RAM."""
    if needed <= available:
        return Check("merge memory", True, f"needs about {_gib(needed)}; {_gib(available)} available")
    return Check(
        "merge memory", False,
        f"the merge needs about {_gib(needed)} of RAM but {_gib(available)} is available: close other "
        "programs or run the merge on a machine with more memory",
    )


def read_weights(model_dir: Path) -> Weights:
    """Parameter count, bytes and largest tensors from the safetensors headers (no tensor is loaded)."""
    from forge.converters.safetensors_io import index_safetensors

    params = total = largest = largest_bytes = embedding = 0
    linear: dict[str, tuple[int, int]] = {}
    for name, t in index_safetensors(model_dir).items():
        numel = math.prod(t.shape)
        params += numel
        total += t.nbytes
        if numel > largest:
            largest, largest_bytes = numel, t.nbytes
        if "embed_tokens" in name or name.endswith("lm_head.weight"):
            embedding += numel
        elif ".layers." in name and name.endswith(".weight") and len(t.shape) == 2:
            linear[name] = (t.shape[0], t.shape[1])
    return Weights(params, total, largest, largest_bytes, embedding, linear)


def lora_params(weights: Weights, cfg: ForgeConfig) -> int:
    """Parameters of the LoRA adapter: r x (in + out) for each targeted linear layer of the blocks."""
    targets = cfg.train.target_modules
    return sum(
        cfg.train.lora_r * (rows + cols)
        for name, (rows, cols) in weights.linear_shapes.items()
        if targets == "all-linear" or name.rsplit(".", 2)[-2] in targets
    )


def planned_bytes(weights: Weights, cfg: ForgeConfig, stages: Iterable[str]) -> dict[str, int]:
    """Bytes each planned stage writes into the run folder (train: its output and peak checkpoints)."""
    stages = set(stages)
    out: dict[str, int] = {}
    if "train" in stages:
        if cfg.train.method == "full":  # fp32 weights + AdamW moments per checkpoint, two during a save
            out["train"] = weights.bytes + 2 * 12 * weights.params
        else:  # fp32 adapter, and its checkpoints (weights + two moments), two during a save
            out["train"] = 4 * lora_params(weights, cfg) * (1 + 2 * 3)
    if "merge" in stages:
        out["merge"] = weights.bytes  # written in the base's dtype
    if "gguf" in stages:
        params = weights.params
        if cfg.ollama.mode == "adapter":  # also the base GGUF and the LoRA as an adapter GGUF, in the same dtype
            params += weights.params + lora_params(weights, cfg)
        out["gguf"] = int(params * BITS_PER_WEIGHT[cfg.export.dtype] / 8)
    if "quantize" in stages:
        out["quantize"] = sum(_gguf_bytes(weights, q) for q in cfg.export.quants)
    return {name: int(n * DISK_MARGIN) for name, n in out.items()}


def merge_memory(weights: Weights, cfg: ForgeConfig) -> int:
    """Peak RAM of the streamed merge: the largest merged matrix in fp32 (weight, B @ A, sum), the largest
    tensor read and written, the adapter, and the process itself."""
    biggest_linear = max((r * c for r, c in weights.linear_shapes.values()), default=0)
    native = weights.largest_bytes / max(weights.largest, 1)
    merged = biggest_linear * (native + 3 * 4)
    copied = 2 * weights.largest_bytes
    return int(max(merged, copied) + 4 * lora_params(weights, cfg) + MERGE_BASELINE)


def free_disk(path: Path) -> int:
    """Free bytes on the filesystem that holds path (or its nearest existing parent)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def available_memory() -> int:
    """Bytes of RAM available to a new allocation (psutil, else /proc/meminfo's MemAvailable)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def dataset_is_conversational(loaded: LoadedConfig) -> bool:
    """Whether any dataset file holds conversations (by data.format, or the keys of its first row)."""
    from forge.data.formats import detect_format
    from forge.data.readers import dataset_files, read_rows, resolve_dataset

    cfg = loaded.config.data
    if cfg.format != "auto":
        return cfg.format in CONVERSATION_FORMATS
    for path in dataset_files(resolve_dataset(cfg.path, loaded.root)):
        record = next((row.record for row in read_rows(path) if row.record is not None), None)
        if record is not None and detect_format(record) in CONVERSATION_FORMATS:
            return True
    return False


def run_checks(
    loaded: LoadedConfig,
    model_dir: Path,
    planned: set[str],
    every: bool = False,
    free_bytes: int | None = None,
    memory_bytes: int | None = None,
) -> list[Check]:
    """Every check on the base model folder; those guarding only stages outside `planned` are skipped
    unless `every`. The disk estimate counts the planned stages; free_bytes / memory_bytes default to this
    machine's."""
    from transformers import AutoTokenizer

    cfg = loaded.config
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.base.trust_remote_code)
    weights = read_weights(model_dir)
    full = cfg.train.method == "full"
    checks: dict[str, Callable[[], Check]] = {
        "architecture": lambda: check_architecture(config),
        "vocabulary": lambda: check_vocabulary(tokenizer, config),
        "double BOS": lambda: check_double_bos(tokenizer),
        "chat template": lambda: check_chat_template(tokenizer, dataset_is_conversational(loaded)),
        "disk": lambda: check_disk(
            planned_bytes(weights, cfg, planned),
            free_disk(loaded.run_dir) if free_bytes is None else free_bytes,
            loaded.run_dir,
        ),
        "merge memory": lambda: (
            Check("merge memory", True, "a full fine-tune is copied, not merged", skipped=True)
            if full
            else check_merge_memory(
                merge_memory(weights, cfg), available_memory() if memory_bytes is None else memory_bytes
            )
        ),
    }
    results = []
    for name, check in checks.items():
        if every or planned & set(GUARDS[name]):
            results.append(check())
        else:
            results.append(Check(name, True, f"{', '.join(GUARDS[name])} cached", skipped=True))
    return results


def will_run(pipe: Pipeline, target: str, force: set[str], verify: bool = False) -> set[str]:
    """The stages `pipe.run(target, force, verify)` would execute."""
    return {p.stage.name for p in pipe.plan(target, verify, force) if p.runs}


def preflight_run(
    pipe: Pipeline, target: str, force: set[str], verify: bool, log: Callable[[str], None]
) -> set[str]:
    """Before `forge run`: when an expensive stage will run, bring the base stage up to date, run the checks
    and raise PreflightError on a failure. Returns the force set for the run that follows: every stage that
    was going to run still runs (a base re-made with the same fingerprint would not make them stale)."""
    planned = will_run(pipe, target, force, verify)
    if not planned & set(EXPENSIVE):
        return force
    if "base" in planned:
        pipe.run("base", force & {"base"}, verify)
        force = force - {"base"}
        force |= planned - {"base"} - will_run(pipe, target, force, verify)
    results = run_checks(pipe.loaded, pipe.run_dir / "base" / "model", planned)
    for check in results:
        log(format_check(check))
    failed = [c for c in results if not c.ok]
    if failed:
        more = f" (and {len(failed) - 1} more above)" if len(failed) > 1 else ""
        raise PreflightError(f"pre-flight check '{failed[0].name}' failed: {failed[0].message}{more}")
    return force


def format_check(check: Check) -> str:
    """One console line (rich markup) for a check."""
    from rich.markup import escape

    if check.skipped:
        return f"[dim]- {check.name:<13} skipped: {escape(check.message)}[/dim]"
    if check.ok:
        return f"[green]✓[/green] {check.name:<13} {escape(check.message)}"
    return f"[red]✗ {check.name:<13} {escape(check.message)}[/red]"


def _gguf_bytes(weights: Weights, qtype: str) -> int:
    bits = BITS_PER_WEIGHT[qtype]
    embedding_bits = max(bits, EMBEDDING_BITS)
    return int(((weights.params - weights.embedding_params) * bits + weights.embedding_params * embedding_bits) / 8)


def _gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
