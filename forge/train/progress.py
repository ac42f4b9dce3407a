"""The training progress bar: step, loss, learning rate, tokens/s and time left."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    """A rich progress bar over optimizer steps; `update` shows the latest loss, lr and throughput."""

    def __init__(self, total_steps: int, done_steps: int, enabled: bool = True) -> None:
        self.bar = Progress(
            TextColumn("[bold]train[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            disable=not enabled,
        )
        self.task = self.bar.add_task("train", total=total_steps, completed=done_steps, stats="")

    def __enter__(self) -> TrainProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, eval_loss: float | None) -> None:
        stats = f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s"
        if eval_loss is not None:
            stats += f"  eval {eval_loss:.4f}"
        self.bar.update(self.task, completed=step, stats=stats)
