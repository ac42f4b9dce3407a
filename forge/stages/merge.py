"""The merge stage: the adapter merged into the base's original weights, as an HF folder (`model/`)."""

from __future__ import annotations

import json
import shutil
from typing import Any

from forge.models.merge import merge_into
from forge.pipeline import Stage, StageContext


class MergeStage(Stage):
    name = "merge"
    version = 1
    needs = ("base", "train")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        base_model = ctx.inputs["base"] / "model"
        trained = ctx.inputs["train"]
        out = ctx.out / "model"
        if (trained / "model").is_dir():  # a full fine-tune: its weights are the model
            shutil.copytree(trained / "model", out)
            facts: dict[str, Any] = {"how": "full fine-tune weights passed through"}
        else:
            facts = merge_into(base_model, trained / "adapter", out)
            method = json.loads((trained / "train_stats.json").read_text()).get("method", "lora")
            if facts["dequantized_nf4"]:
                facts["how"] = "merged into the dequantized NF4 base (no 16-bit original available)"
            elif method == "qlora":
                facts["how"] = "merged into the original 16-bit weights (the adapter was trained on NF4)"
            else:
                facts["how"] = "merged into the base weights"
            facts["how"] += f", {facts['merged_modules']} modules"
        ctx.log(f"  {facts['how']}")
        (ctx.out / "merge.json").write_text(json.dumps(facts, indent=2))
        return {**facts, "line": facts["how"]}
