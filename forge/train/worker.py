"""One rank of a multi-process train stage, started by torchrun: python -m forge.train.worker SPEC.json.

SPEC (written by `launch.launch_training`): base_dir, data_dir, config (TrainConfig fields), out, work,
run_id. Every rank runs the recipe; rank 0 logs and writes.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch.distributed as dist
from transformers.utils import logging as hf_logging

from forge.config import TrainConfig
from forge.train.distributed import rank_log, start
from forge.train.launch import ERROR_MARK
from forge.train.recipe import run_training


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    parallel = start()
    hf_logging.disable_progress_bar()  # a log read through a pipe, not a terminal
    if not parallel.is_main:
        hf_logging.set_verbosity_error()  # rank 0 says it once
    try:
        run_training(
            Path(spec["base_dir"]),
            Path(spec["data_dir"]),
            TrainConfig(**spec["config"]),
            Path(spec["out"]),
            Path(spec["work"]),
            log=rank_log(parallel, lambda line: print(line, flush=True)),
            run_id=spec["run_id"],
            show_progress=False,
            parallel=parallel,
        )
    except KeyboardInterrupt:  # Ctrl-C: rank 0 has said where the next run resumes
        return 130
    except Exception as exc:  # the traceback goes to stderr, the one-line reason to the launcher
        traceback.print_exc()
        print(f"{ERROR_MARK} rank {parallel.rank}: {exc}", flush=True)
        return 1
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
