"""Load the base model for one fine-tuning method: LoRA, rsLoRA, QLoRA (NF4 base) or full."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from forge.config import TrainConfig
from forge.models.patching import patch_for_training
from forge.train.precision import Precision


def kernels_choice(setting: str, device: torch.device) -> str:
    """Whether Forge's Triton kernels run, and why, as the line the stage logs."""
    if setting == "off":
        return "kernels: off (train.kernels=off)"
    if device.type != "cuda":
        return "kernels: off (no CUDA)"
    return "kernels: on (forge.models patching; Triton)"


def keep_4bit_trainable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking NF4 weights for its CPU inference kernel during evaluation.

    On CPUs with AVX512-BF16, bitsandbytes 0.50's Linear4bit repacks its weight the first time it runs in
    eval mode and from then on uses a kernel without a backward, also after model.train(): the gradients
    of every layer below would silently be wrong.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def qlora_quantization(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """How QLoRA loads the base: bitsandbytes NF4 with double quantization, computing in `compute_dtype`."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def linear_layer_names(model: torch.nn.Module) -> set[str]:
    """Short names (q_proj, up_proj, ...) of the linear layers inside the decoder, the output head excluded."""
    head = model.get_output_embeddings()
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }


def lora_targets(model: torch.nn.Module, wanted: list[str] | str) -> list[str] | str:
    """cfg.target_modules checked against the model: 'all-linear' or names that all exist."""
    if wanted == "all-linear":
        return wanted
    present = linear_layer_names(model)
    for name in wanted:
        if name not in present:
            raise ValueError(
                f"train.target_modules: '{name}' is no linear layer of the base model "
                f"(it has: {', '.join(sorted(present))})"
            )
    return list(wanted)


def load_model(
    base_dir: Path,
    cfg: TrainConfig,
    precision: Precision,
    device: torch.device,
    log: Callable[[str], None],
    load_device: torch.device | None = None,
) -> torch.nn.Module:
    """The base model on `device`, ready to train with cfg.method (only the trained weights need grads).

    load_device: where the weights go instead (FSDP loads on the CPU and shards onto `device` afterwards).

    Frozen weights are kept in the compute dtype (QLoRA: NF4 with double quantization); LoRA weights and
    full fine-tuning's weights are fp32 masters, run under autocast.
    """
    kwargs: dict = {"dtype": torch.float32 if cfg.method == "full" else precision.dtype}
    if cfg.method == "qlora":
        kwargs["quantization_config"] = qlora_quantization(precision.dtype)
        kwargs["device_map"] = {"": str(device)}
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if cfg.method == "qlora":
        keep_4bit_trainable(model)
    else:
        model.to(load_device or device)
    model.config.use_cache = False
    choice = kernels_choice(cfg.kernels, device)
    log(choice)
    if cfg.method == "full":
        model.requires_grad_(True)
        return _patched(model, choice, log)
    model.requires_grad_(False)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_targets(model, cfg.target_modules),
        use_rslora=cfg.method == "rslora",
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # PEFT 0.21 asks transformers 5.23 a deprecated question; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return _patched(get_peft_model(model, lora), choice, log)


def _patched(model: torch.nn.Module, choice: str, log: Callable[[str], None]) -> torch.nn.Module:
    """The model with Forge's fused forwards where kernels are on (after the adapters wrap the layers)."""
    if choice.startswith("kernels: on"):
        patch_for_training(model, log=log)
    return model


def pad_token_id(model: torch.nn.Module) -> int:
    """The id used to fill padding (never attended to, never a target): pad, else eos, else 0."""
    config = model.config
    for candidate in (getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


def trainable_count(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters); a packed 4-bit weight counts its unpacked elements."""

    def elements(p: torch.nn.Parameter) -> int:
        quant_state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit
        return quant_state.shape.numel() if quant_state is not None else p.numel()

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(elements(p) for p in model.parameters())
