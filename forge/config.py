"""The schema of forge.yaml: every field has a default, unknown keys are errors, `--set` overrides."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the file and the key."""


class Section(BaseModel):
    """Base of every config section: unknown keys are rejected, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = Field("default", description="Run name: outputs go to <dir>/<name>/<stage>/.")
    dir: str = Field("runs", description="Folder that holds the runs (relative to the config file).")


class BaseModelConfig(Section):
    model: str = Field(
        "builtin:smollm2-135m-instruct",
        description="Base model: a local HF folder, a Hub id already in the local HF cache, a .gguf file, "
        "or builtin:smollm2-135m-instruct.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a Hub id.")
    trust_remote_code: bool = Field(False, description="Allow model code shipped with the checkpoint.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Dtype of the normalized weights; auto keeps the checkpoint's (GGUF: float32, exact).",
    )


class DataConfig(Section):
    path: str = Field(
        "builtin:sample",
        description="Dataset: a .jsonl/.json/.csv/.parquet file, a folder of them, or builtin:sample.",
    )
    format: Literal["auto", "alpaca", "sharegpt", "messages", "text"] = Field(
        "auto", description="Row format; auto detects it from the keys and says what it chose."
    )
    train_on: Literal["responses", "all"] = Field(
        "responses", description="Which tokens carry labels: the assistant turns only, or everything."
    )
    max_seq_len: int = Field(1024, gt=0, description="Examples longer than this are truncated (reported).")
    packing: bool = Field(False, description="Pack short examples into full sequences (no cross-attention).")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of examples held out for eval.")
    seed: int = Field(0, description="Seed of the deterministic train/eval split.")
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="On a bad row: stop with file:line, or skip it and count it."
    )
    system_prompt: str | None = Field(None, description="System message added to conversations without one.")


class TrainConfig(Section):
    method: Literal["lora", "rslora", "qlora", "full"] = Field("lora", description="Fine-tuning method.")
    lora_r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA alpha (scale alpha/r; rsLoRA alpha/sqrt(r)).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Linear layers that get adapters: all-linear or a list of module names."
    )
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training split (ignored with max_steps).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs when set.")
    batch_size: int = Field(4, gt=0, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Share of steps with linear warm-up.")
    schedule: Literal["linear", "cosine", "constant"] = Field(
        "cosine", description="LR schedule after warm-up."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm (null: off).")
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="Optimizer (8-bit from bitsandbytes)."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Compute precision; auto picks bf16/fp16 by device capability, fp32 on CPU."
    )
    eval_every: int = Field(
        50, gt=0, description="Evaluate on the held-out split every N steps (and at the end)."
    )
    save_every: int = Field(50, gt=0, description="Checkpoint every N steps (resume point).")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after this many evals without improvement (null: never)."
    )
    seed: int = Field(42, description="Seed of initialisation, shuffling and dropout.")
    kernels: Literal["auto", "off"] = Field("auto", description="Use Forge's Triton kernels on CUDA.")
    gradient_checkpointing: Literal["auto", "full", "none", "offload"] = Field(
        "auto",
        description="Activation checkpointing: by free memory (auto: spare memory also keeps dequantized 4-bit "
        "weights and GLU outputs), always, never, or CPU offload.",
    )
    log_every: int = Field(1, gt=0, description="Write a metrics.jsonl line every N steps.")
    wandb_project: str | None = Field(None, description="Log to Weights & Biases when installed and set.")
    nproc: int = Field(
        1,
        gt=0,
        description="Training processes on this host through torchrun, one per GPU (`forge run --gpus N`); "
        "without CUDA, N CPU processes (gloo). Same result as 1: not part of the fingerprint.",
    )
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="With nproc > 1: ddp replicates the model, fsdp shards it (FSDP2); auto: fsdp for full "
        "fine-tunes and bases over half a GPU, else ddp. Not part of the fingerprint.",
    )


Quant = Literal["q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0", "f16", "bf16"]


class ExportConfig(Section):
    dtype: Literal["f16", "bf16", "f32"] = Field("f16", description="Type of the unquantized GGUF.")
    quants: list[Quant] = Field(["q4_k_m", "q8_0"], description="GGUF types made by the quantize stage.")
    nthread: int | None = Field(None, gt=0, description="Quantizer threads (null: all cores).")


class EvalConfig(Section):
    prompts: list[str] = Field(
        [], description="Chat prompts for the generation smoke test (default: eval split)."
    )
    max_tokens: int = Field(256, gt=0, description="A generation must stop within this many tokens.")
    max_ppl_increase: dict[str, float] = Field(
        {"q8_0": 0.01, "q4_k_m": 0.10},
        description="Gate: allowed relative perplexity increase of each quant over the f16 GGUF.",
    )
    gate: bool = Field(True, description="Fail the stage when a threshold is missed.")
    max_gguf_hf_gap: float = Field(
        0.02,
        ge=0.0,
        description="Gate: allowed relative perplexity difference between the unquantized GGUF and the "
        "merged HF model (catches conversion errors).",
    )
    max_eval_tokens: int = Field(
        4096, gt=1, description="Held-out tokens every model is scored on (the first examples, in order)."
    )
    num_prompts: int = Field(
        4, gt=0, description="Held-out conversations used as smoke-test prompts when eval.prompts is empty."
    )
    repeat_penalty: float = Field(
        1.1, ge=1.0, description="Repeat penalty of the greedy smoke-test generations (Ollama's default)."
    )
    threads: int | None = Field(
        None, gt=0, description="CPU threads for llama.cpp and PyTorch (null: half the logical CPUs)."
    )


class OllamaConfig(Section):
    name: str | None = Field(None, description="Ollama model name (default: the run name).")
    quant: Quant = Field("q4_k_m", description="GGUF that `ollama create` uses.")
    template: str | None = Field(None, description="Go template that overrides the derived TEMPLATE.")
    system: str | None = Field(None, description="SYSTEM prompt written into the Modelfile.")
    parameters: dict[str, Any] = Field(
        {}, description="Modelfile PARAMETERs (temperature, top_p, num_ctx, ...)."
    )
    license: str | None = Field(None, description="LICENSE text or SPDX id.")
    mode: Literal["merged", "adapter"] = Field(
        "merged",
        description="merged: Modelfiles over the merged GGUFs; adapter: also the LoRA as a GGUF adapter over the "
        "base GGUF (adapter.Modelfile, used by `ollama create`).",
    )


class PushConfig(Section):
    repo: str | None = Field(None, description="Hub repository, e.g. user/name-GGUF (required to push).")
    private: bool = Field(True, description="Create the repository private.")
    revision: str = Field("main", description="Branch to commit to.")
    what: list[Literal["gguf", "modelfile", "adapter", "merged"]] = Field(
        ["gguf", "modelfile", "adapter"], description="What to upload."
    )
    dry_run: bool = Field(
        False, description="List what would be uploaded (path, size, sha256) in push.json; no network."
    )
    base_model: str | None = Field(
        None, description="Hub id of the base model for the model card (null: derived from base.model)."
    )
    license: str | None = Field(
        None, description="License id for the model card, e.g. apache-2.0 (null: the base model's)."
    )
    datasets: list[str] = Field([], description="Hub ids of the training datasets for the model card.")


class ForgeConfig(Section):
    run: RunConfig = RunConfig()
    base: BaseModelConfig = BaseModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    eval: EvalConfig = EvalConfig()
    ollama: OllamaConfig = OllamaConfig()
    push: PushConfig = PushConfig()

    @model_validator(mode="after")
    def _adapter_mode_needs_an_adapter(self) -> ForgeConfig:
        if self.ollama.mode == "adapter" and self.train.method == "full":
            raise ValueError(
                "'ollama.mode': adapter needs a LoRA adapter, but train.method is full; use ollama.mode merged"
            )
        return self


class LoadedConfig(BaseModel):
    """The validated config plus where it came from (the folder relative paths resolve against)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    config: ForgeConfig
    source: str
    root: Path

    def resolve(self, path: str) -> Path:
        """A path from the config, made absolute against the config file's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.root / p).resolve()

    @property
    def run_dir(self) -> Path:
        return self.resolve(self.config.run.dir) / self.config.run.name


def _closest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid: {', '.join(options)})"


def check_keys(raw: Any, model: type[BaseModel] = ForgeConfig, prefix: str = "") -> None:
    """Raise ConfigError for the first key that the schema does not know, naming the closest valid one."""
    if not isinstance(raw, dict):
        return
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in model.model_fields:
            options = list(model.model_fields)
            raise ConfigError(f"unknown key '{dotted}'{_closest(str(key), options)}")
        annotation = model.model_fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if not isinstance(value, dict):
                raise ConfigError(f"'{dotted}' must be a mapping of keys, got {type(value).__name__}")
            check_keys(value, annotation, dotted + ".")


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `--set a.b=value` override (value parsed as YAML) to a raw config dict in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    dotted, _, text = assignment.partition("=")
    parts = [p for p in dotted.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: '{part}' is not a section")
    node[parts[-1]] = _parse_scalar(text)


def _parse_scalar(text: str) -> Any:
    value = yaml.safe_load(text) if text.strip() else ""
    # YAML 1.1 reads 1e-4 as a string; a number is what everyone means.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            return value
    return value


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    if not first["loc"]:  # a check across sections names its keys itself
        return first["msg"].removeprefix("Value error, ")
    where = ".".join(str(p) for p in first["loc"])
    return f"'{where}': {first['msg']}"


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> LoadedConfig:
    """Read forge.yaml (or PATH, or nothing: defaults), apply overrides, validate strictly."""
    raw: dict = {}
    source = "defaults"
    root = Path.cwd()
    if path is None and Path("forge.yaml").is_file():
        path = Path("forge.yaml")
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        raw = loaded or {}
        source = str(path)
        root = path.resolve().parent
    try:
        check_keys(raw)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    for assignment in overrides or []:
        apply_override(raw, assignment)
        try:
            check_keys(raw)
        except ConfigError as exc:
            raise ConfigError(f"--set {assignment}: {exc}") from None
    try:
        config = ForgeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_first_error(exc)}") from None
    return LoadedConfig(config=config, source=source, root=root)


def section_dump(config: ForgeConfig, dotted: str) -> Any:
    """The JSON-able value at a dotted path of the config, e.g. 'train' or 'base.model'."""
    node: Any = config.model_dump(mode="json")
    for part in dotted.split("."):
        node = node[part]
    return node


def reference_markdown() -> str:
    """The config reference as markdown tables, one per section (README embeds this text)."""
    lines: list[str] = []
    for section, field in ForgeConfig.model_fields.items():
        model = field.annotation
        lines += [f"### `{section}`", "", "| key | default | meaning |", "|---|---|---|"]
        for key, f in model.model_fields.items():
            default = json.dumps(f.default) if f.default is not None else "null"
            lines.append(f"| `{section}.{key}` | `{default}` | {f.description or ''} |")
        lines.append("")
    return "\n".join(lines)
