"""Fixtures of the training tests: a tiny random Llama and character-level splits of a learnable task."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from forge.config import TrainConfig
from forge.torch_threads import torch_threads
from forge.train.model import keep_4bit_trainable, qlora_quantization

from .synthetic import BOS, EOS, PAD, VOCAB, arithmetic_examples, write_data


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama saved as an HF folder (fp32)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def arithmetic_data(tmp_path_factory) -> Path:
    """48 training and 16 eval examples of the arithmetic task, one example per sequence."""
    folder = tmp_path_factory.mktemp("arith-data")
    return write_data(folder, arithmetic_examples(48, seed=1), arithmetic_examples(16, seed=2))


@pytest.fixture
def small_config() -> Callable[..., TrainConfig]:
    """TrainConfig for tiny runs: fp32, few steps, no progress bar surprises; overrides by keyword."""

    def make(**overrides) -> TrainConfig:
        base = dict(
            lr=3e-3, batch_size=8, max_steps=6, eval_every=3, save_every=3, lora_r=4, lora_alpha=8.0, precision="fp32"
        )
        return TrainConfig(**{**base, **overrides})

    return make


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and the 2-core CI machine is shared with other tests."""
    with torch_threads(1):
        yield


@pytest.fixture
def nf4_base() -> Callable[[Path], torch.nn.Module]:
    """Loads a saved model as QLoRA does on the CPU: NF4, double quantization, fp32 compute."""

    def load(model_dir: Path) -> torch.nn.Module:
        quant = qlora_quantization(torch.float32)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map={"": "cpu"})
        keep_4bit_trainable(model)
        return model

    return load
