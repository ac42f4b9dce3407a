"""Stage 'train': base model + token splits -> PEFT adapter (or full weights), metrics and stats."""

from __future__ import annotations

from typing import Any

from forge.pipeline import Stage, StageContext


class TrainStage(Stage):
    """Fine-tunes the base model with LoRA, rsLoRA, QLoRA or full fine-tuning; resumable from checkpoints."""

    name = "train"
    version = 1
    needs = ("base", "data")
    config_keys = ("train",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        # imported here: peft and bitsandbytes take seconds to load, and every `forge` command builds the stages
        from forge.train.recipe import run_training

        return run_training(
            base_dir=ctx.inputs["base"] / "model",
            data_dir=ctx.inputs["data"],
            cfg=ctx.config.train,
            out=ctx.out,
            work=ctx.work,
            log=ctx.log,
            run_id=ctx.fingerprint[:16],
        )
