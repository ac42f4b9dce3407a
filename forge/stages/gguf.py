"""The gguf stage: the merged HF model converted by Forge's own converter into `model-<dtype>.gguf`."""

from __future__ import annotations

import json
from typing import Any

from forge.converters import convert_hf_to_gguf
from forge.pipeline import Stage, StageContext


class GgufStage(Stage):
    name = "gguf"
    version = 1
    needs = ("merge",)
    config_keys = ("export.dtype",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        dtype = ctx.config.export.dtype
        result = convert_hf_to_gguf(
            ctx.inputs["merge"] / "model", ctx.out / f"model-{dtype}.gguf", dtype, {"name": ctx.config.run.name}
        )
        facts = {**result.to_dict(), "path": result.path.name}
        (ctx.out / "gguf.json").write_text(json.dumps(facts, indent=2))
        line = (
            f"{result.gguf_architecture} {dtype}, {result.tensor_count} tensors, "
            f"{result.size_bytes / 2**20:.0f} MiB, tokenizer {result.tokenizer_model}/{result.tokenizer_pre}"
        )
        return {**facts, "line": line}
