"""A training run in its own process, for the resume tests to kill: python train_child.py SPEC_JSON.

SPEC: model, data, out, work (paths), config (TrainConfig fields) and optionally die_saving_step: the
process SIGKILLs itself in the middle of writing that step's checkpoint; or pause_after_step: once that
step's checkpoint is complete the run waits (a minute at most) for the test's signal.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from forge.config import TrainConfig
from forge.train import checkpoint, loop
from forge.train.recipe import run_training


def die_while_saving(step: int) -> None:
    """Make the checkpoint of `step` kill the process after its weights file is written, before its state."""
    real_save = checkpoint.torch.save

    def save(obj, path, *args, **kwargs):
        if Path(path).parent.name.startswith(f"{checkpoint.TMP_PREFIX}{step:07d}"):
            Path(path).write_bytes(b"\x80\x02partial")
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(obj, path, *args, **kwargs)

    checkpoint.torch.save = save


def pause_after_saving(step: int) -> None:
    """Make the run wait after the checkpoint of `step` is in place, so a signal surely lands mid-run."""
    real_save = loop.save_checkpoint

    def save(root, saved_step, *args, **kwargs):
        result = real_save(root, saved_step, *args, **kwargs)
        if saved_step == step:
            print(f"paused after checkpoint step-{step:07d}", flush=True)
            time.sleep(60)
        return result

    loop.save_checkpoint = save


def main() -> None:
    spec = json.loads(sys.argv[1])
    # A test's SIGINT must raise KeyboardInterrupt as Ctrl-C does, also when the tests run as a background job
    # of a non-interactive shell (which starts every child with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.set_num_threads(1)
    if spec.get("die_saving_step"):
        die_while_saving(spec["die_saving_step"])
    if spec.get("pause_after_step"):
        pause_after_saving(spec["pause_after_step"])
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    run_training(
        Path(spec["model"]),
        Path(spec["data"]),
        TrainConfig(**spec["config"]),
        out,
        Path(spec["work"]),
        log=lambda line: print(line, flush=True),
        show_progress=False,
    )


if __name__ == "__main__":
    main()
