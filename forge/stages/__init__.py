"""The nine stages in pipeline order."""

from __future__ import annotations

from forge.pipeline import Stage
from forge.stages.base import BaseStage
from forge.stages.data import DataStage
from forge.stages.eval import EvalStage
from forge.stages.gguf import GgufStage
from forge.stages.merge import MergeStage
from forge.stages.ollama import OllamaStage
from forge.stages.push import PushStage
from forge.stages.quantize import QuantizeStage
from forge.stages.train import TrainStage


def all_stages() -> list[Stage]:
    """The stages in the order they run."""
    return [
        BaseStage(),
        DataStage(),
        TrainStage(),
        MergeStage(),
        GgufStage(),
        QuantizeStage(),
        EvalStage(),
        OllamaStage(),
        PushStage(),
    ]
