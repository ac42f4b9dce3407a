"""The gguf stage: the merged HF model converted by Forge's own converter into `model-<dtype>.gguf`.

With ollama.mode adapter it also writes the LoRA as `adapter-<dtype>.gguf` and the base as `base-<dtype>.gguf`.
"""

from __future__ import annotations

import json
from typing import Any

from forge.converters import ConversionError, convert_hf_to_gguf, convert_lora_to_gguf
from forge.converters.hf_config import load_model_config
from forge.modelfiles import OLLAMA_ENGINE_ARCHITECTURES
from forge.pipeline import Stage, StageContext
from forge.provenance import base_gguf_metadata, chat_template_sha256, collect, gguf_metadata


class GgufStage(Stage):
    name = "gguf"
    version = 3  # 2: provenance keys (base and data are read for them); 3: also in the adapter and base GGUFs
    needs = ("base", "data", "train", "merge")
    config_keys = ("export.dtype", "ollama.mode")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        dtype = ctx.config.export.dtype
        model = ctx.inputs["merge"] / "model"
        provenance = collect(ctx.loaded, ctx.inputs["base"], ctx.inputs["data"], model)
        adapter_mode = adapter_over_base(ctx, dtype, provenance) if ctx.config.ollama.mode == "adapter" else None
        (ctx.out / "provenance.json").write_text(json.dumps(provenance, indent=2))
        metadata = {"name": ctx.config.run.name, **gguf_metadata(provenance)}
        result = convert_hf_to_gguf(model, ctx.out / f"model-{dtype}.gguf", dtype, metadata)
        facts = {**result.to_dict(), "path": result.path.name}
        if adapter_mode:
            facts["adapter_mode"] = adapter_mode
        (ctx.out / "gguf.json").write_text(json.dumps(facts, indent=2))
        line = (
            f"{result.gguf_architecture} {dtype}, {result.tensor_count} tensors, "
            f"{result.size_bytes / 2**20:.0f} MiB, tokenizer {result.tokenizer_model}/{result.tokenizer_pre}"
        )
        if adapter_mode:
            line += f"; {adapter_mode['adapter']} ({adapter_mode['modules']} LoRA modules) over {adapter_mode['base']}"
        return {**facts, "line": line}


def adapter_over_base(ctx: StageContext, dtype: str, provenance: dict[str, Any]) -> dict[str, Any]:
    """ollama.mode adapter: the trained LoRA as a llama.cpp adapter GGUF, and the base model it was trained on
    as the GGUF it applies to (converted from the base stage's folder: its tokenizer is the one trained with).

    The adapter carries the run's provenance keys, the base GGUF those about the base model and the tools."""
    adapter, base = ctx.inputs["train"] / "adapter", ctx.inputs["base"] / "model"
    if not adapter.is_dir():
        raise ConversionError(f"{adapter}: missing; ollama.mode adapter needs the train stage's LoRA adapter")
    quantization = json.loads((base / "config.json").read_text()).get("quantization_config")
    if quantization:
        raise ConversionError(
            f"{base / 'config.json'}: the base model is {quantization.get('quant_method', 'quantized')}-quantized, "
            "with no 16-bit weights for the adapter to sit on; use ollama.mode merged"
        )
    arch = load_model_config(base).spec.arch_name
    if arch in OLLAMA_ENGINE_ARCHITECTURES:
        raise ConversionError(
            f"ollama.mode adapter: Ollama runs {arch} models on its own engine, which does not load LoRA adapters; "
            "use ollama.mode merged"
        )
    name = ctx.config.run.name
    lora_keys = {"name": f"{name}-lora", **gguf_metadata(provenance)}
    lora = convert_lora_to_gguf(adapter, base, ctx.out / f"adapter-{dtype}.gguf", dtype, lora_keys)
    ctx.log(f"  adapter: {lora.modules} LoRA modules, ranks {lora.ranks}, alpha {lora.alpha:g}, {lora.seconds:.1f}s")
    base_keys = {"name": f"{name}-base", **base_gguf_metadata(provenance, chat_template_sha256(base))}
    base_gguf = convert_hf_to_gguf(base, ctx.out / f"base-{dtype}.gguf", dtype, base_keys)
    return {
        "adapter": lora.path.name,
        "base": base_gguf.path.name,
        "modules": lora.modules,
        "ranks": lora.ranks,
        "alpha": lora.alpha,
        "rescaled": lora.rescaled,
        "adapter_size": lora.size_bytes,
        "base_size": base_gguf.size_bytes,
    }
