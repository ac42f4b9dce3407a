"""The nine stages in pipeline order; a stage whose code has not landed yet stops the run plainly."""

from __future__ import annotations

from forge.pipeline import Stage
from forge.stages.base import BaseStage


class PendingStage(Stage):
    """A stage that is part of the order but not built yet: `forge run` stops there with exit code 2."""

    built = False

    def __init__(self, name: str, needs: tuple[str, ...]) -> None:
        self.name = name
        self.needs = needs


def all_stages() -> list[Stage]:
    """The stages in the order they run."""
    stages: list[Stage] = [BaseStage()]
    try:
        from forge.stages.data import DataStage
    except ImportError:
        stages.append(PendingStage("data", ("base",)))
    else:
        stages.append(DataStage())
    try:
        from forge.stages.train import TrainStage
    except ImportError:
        stages.append(PendingStage("train", ("base", "data")))
    else:
        stages.append(TrainStage())
    stages += [
        PendingStage("merge", ("base", "train")),
        PendingStage("gguf", ("merge",)),
        PendingStage("quantize", ("gguf",)),
        PendingStage("eval", ("merge", "quantize")),
        PendingStage("ollama", ("quantize", "eval")),
        PendingStage("push", ("quantize", "ollama")),
    ]
    return stages
