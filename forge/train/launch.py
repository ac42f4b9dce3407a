"""Run the train stage on several processes of this host: torchrun starts `forge.train.worker` once per
rank; this process streams rank 0's log and returns the stats rank 0 wrote (the pipeline still owns the
stage's temporary output folder, its manifest and the final rename)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forge.config import TrainConfig

SPEC_FILE = "launch.json"
ERROR_MARK = "forge-train-error:"  # a worker's one-line error, picked out of the log


class LaunchError(RuntimeError):
    """The multi-process run could not start or a rank failed; the message is one line."""


def torchrun_command(nproc: int, spec: Path) -> list[str]:
    """torchrun on this host (a free rendezvous port) running one worker per rank."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "forge.train.worker", str(spec),
    ]  # fmt: skip


def worker_env(nproc: int) -> dict[str, str]:
    """The workers' environment: unbuffered output, no current folder on sys.path (a checkout's top-level
    `kernels/` would shadow the PyPI name bitsandbytes probes) and, unless set, the CPU cores shared out."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def check_devices(nproc: int) -> None:
    import torch

    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise LaunchError(
            f"train.nproc={nproc}: only {torch.cuda.device_count()} CUDA devices are visible "
            "(CUDA_VISIBLE_DEVICES= runs CPU processes instead)"
        )


def stream(proc: subprocess.Popen, log: Callable[[str], None], errors: list[str]) -> None:
    """Pass the workers' output to `log` line by line until it ends; ranks' one-line errors go to `errors`."""
    for line in proc.stdout:
        line = line.rstrip("\n")
        if line.startswith(ERROR_MARK):
            errors.append(line[len(ERROR_MARK) :].strip())
        else:
            log(line)


def launch_training(
    base_dir: Path,
    data_dir: Path,
    cfg: TrainConfig,
    out: Path,
    work: Path,
    log: Callable[[str], None] = print,
    run_id: str = "",
) -> dict[str, Any]:
    """`recipe.run_training` on cfg.nproc processes; returns rank 0's stats plus the summary line."""
    from forge.train.output import STATS_FILE
    from forge.train.recipe import summary_line

    check_devices(cfg.nproc)
    work.mkdir(parents=True, exist_ok=True)
    spec = work / SPEC_FILE
    spec.write_text(
        json.dumps(
            {
                "base_dir": str(base_dir),
                "data_dir": str(data_dir),
                "config": cfg.model_dump(mode="json"),
                "out": str(out),
                "work": str(work),
                "run_id": run_id,
            }
        )
    )
    noun = "processes" if cfg.nproc > 1 else "process"
    log(f"launching {cfg.nproc} training {noun}: torchrun --standalone --nproc-per-node={cfg.nproc}")
    proc = subprocess.Popen(
        torchrun_command(cfg.nproc, spec),
        env=worker_env(cfg.nproc),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    errors: list[str] = []
    try:
        stream(proc, log, errors)
        code = proc.wait()
    except KeyboardInterrupt:  # the terminal's Ctrl-C reached the workers too: show how they stop, then stop
        try:
            stream(proc, log, errors)
            proc.wait(timeout=60)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):  # a second Ctrl-C, or a rank that hangs
            proc.kill()
        raise
    finally:
        spec.unlink(missing_ok=True)
    if code != 0:
        why = errors[0] if errors else f"exit code {code}, see the log above"
        raise LaunchError(f"train: {cfg.nproc}-process run failed: {why}")
    stats = json.loads((out / STATS_FILE).read_text())
    return {**stats, "line": summary_line(stats)}
