"""Activation checkpointing by free memory, and turning it on for real."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from forge.train.memory import choose_checkpointing, enable_checkpointing, free_memory_bytes, training_bytes_estimate

CPU = torch.device("cpu")


def test_auto_turns_checkpointing_on_only_when_memory_would_run_short(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    free = free_memory_bytes(CPU)
    assert free is not None and free > 0
    per_token = training_bytes_estimate(model, 2, act_bytes=4) - training_bytes_estimate(model, 1, act_bytes=4)
    small = 1024
    huge = int(free / per_token) + 1  # a micro-batch whose activations alone exceed the free memory
    assert choose_checkpointing("auto", model, small, CPU, 4)[0] == "none"
    mode, why = choose_checkpointing("auto", model, huge, CPU, 4)
    assert mode == "full" and "GiB free" in why
    assert choose_checkpointing("none", model, huge, CPU, 4)[0] == "none"


def test_offload_without_a_gpu_falls_back_and_says_why(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert choose_checkpointing("offload", model, 64, CPU, 4) == ("none", "offload needs a GPU to offload from")


def test_enable_checkpointing_marks_every_decoder_layer(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    enable_checkpointing(model)
    layers = model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
