"""A learnable character-level task for the training tests: tokenized text, masked like the data stage does."""

from __future__ import annotations

import random
from pathlib import Path

from forge.data.shards import IGNORE_INDEX, Example, build_split, save_split

PAD, BOS, EOS = 0, 1, 2
VOCAB = 128


def char_ids(text: str) -> list[int]:
    """Character-level tokenization: printable ASCII onto ids 3..97."""
    return [3 + ord(c) - 32 for c in text]


def example(prompt: str, answer: str) -> Example:
    """BOS + prompt (masked) + answer + EOS (trained), like the data stage's response-only masking."""
    prompt_ids = [BOS] + char_ids(prompt)
    answer_ids = char_ids(answer) + [EOS]
    return Example(prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids)


def arithmetic_examples(n: int, seed: int) -> list[Example]:
    """'12+7=' -> '19': short examples of varying length with a pattern a tiny model picks up quickly."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        out.append(example(f"{a}+{b}=", str(a + b)))
    return out


def write_data(folder: Path, train: list[Example], eval_: list[Example], pack: int = 1) -> Path:
    """train.safetensors / eval.safetensors as the data stage writes them; `pack` examples per sequence."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, examples in (("train", train), ("eval", eval_)):
        sequences = [examples[i : i + pack] for i in range(0, len(examples), pack)]
        save_split(build_split(sequences), folder / f"{name}.safetensors")
    return folder
