"""Training metrics: metrics.jsonl, TensorBoard events, optional Weights & Biases, and the loss-curve PNG."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file (an unfinished last line from a kill is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


class MetricsLog:
    """Appends rows to metrics.jsonl and TensorBoard in `folder`; a resumed run first drops the rows past
    the checkpoint it resumes from, so the logs read as one uninterrupted run."""

    def __init__(
        self,
        folder: Path,
        resume_step: int | None,
        wandb_project: str | None = None,
        run_id: str = "",
        config: dict[str, Any] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / METRICS_FILE
        if resume_step is None:  # a fresh start: whatever an earlier, checkpoint-less attempt wrote goes
            kept = []
            shutil.rmtree(folder / TB_DIR, ignore_errors=True)
        else:
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self._file = self.path.open("a")
        # purge_step hides the events of steps the resumed run writes again.
        purge = resume_step + 1 if resume_step is not None else None
        self.tb = SummaryWriter(str(folder / TB_DIR), purge_step=purge)
        self.wandb = _start_wandb(wandb_project, run_id, config or {}, folder, log)

    def write(self, row: dict[str, Any]) -> None:
        """Record one row; every numeric field but `step` becomes a TensorBoard scalar."""
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        step = row["step"]
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        for key, value in scalars.items():
            self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(project: str | None, run_id: str, config: dict[str, Any], folder: Path, log):
    """A Weights & Biases run when a project is set and wandb is installed; never required."""
    if not project:
        return None
    try:
        import wandb
    except ImportError:
        log(f"wandb: off (train.wandb_project={project} is set but wandb is not installed)")
        return None
    log(f"wandb: logging to project {project}")
    return wandb.init(project=project, id=run_id or None, resume="allow", config=config, dir=str(folder))


def plot_losses(rows: list[dict[str, Any]], path: Path) -> None:
    """Write the train and eval loss curves over steps as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed

    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if r.get("eval_loss") is not None]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", linewidth=1)
    if evals:
        ax.plot(
            [r["step"] for r in evals], [r["eval_loss"] for r in evals], label="eval loss", marker="o", linewidth=1.5
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per target token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
