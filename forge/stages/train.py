"""Stage 'train': base model + token splits -> PEFT adapter (or full weights), metrics and stats."""

from __future__ import annotations

from typing import Any

from forge.pipeline import PipelineError, Stage, StageContext


class TrainStage(Stage):
    """Fine-tunes the base model with LoRA, rsLoRA, QLoRA or full fine-tuning; resumable from checkpoints."""

    name = "train"
    version = 1
    needs = ("base", "data")
    config_keys = ("train",)
    run_only_keys = ("train.nproc", "train.distributed")  # N processes train what 1 does

    def run(self, ctx: StageContext) -> dict[str, Any]:
        job = dict(
            base_dir=ctx.inputs["base"] / "model",
            data_dir=ctx.inputs["data"],
            cfg=ctx.config.train,
            out=ctx.out,
            work=ctx.work,
            log=ctx.log,
            run_id=ctx.fingerprint[:16],
        )
        if ctx.config.train.nproc > 1:  # torchrun runs the recipe on every rank; rank 0 writes ctx.out
            from forge.train.launch import LaunchError, launch_training

            try:
                return launch_training(**job)
            except LaunchError as exc:
                raise PipelineError(str(exc)) from None
        # imported here: peft and bitsandbytes take seconds to load, and every `forge` command builds the stages
        from forge.train.recipe import run_training

        return run_training(**job)
