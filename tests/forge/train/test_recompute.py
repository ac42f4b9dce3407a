"""Activation recomputation by memory: the plan, and layers that recompute giving the same gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from forge.models.fused_forwards import KEEP_GLU_OUTPUT
from forge.models.patching import patch_for_training
from forge.models.projections import DENSE_CACHE, four_bit_linears
from forge.train.link import LinkSpeed
from forge.train.memory import free_memory_bytes
from forge.train.recompute import (
    HEADROOM,
    HostCopy,
    apply_recompute,
    decoder_layers,
    glu_output_bytes,
    layer_activation_bytes,
    layer_input_bytes,
    plan_for_model,
    plan_recompute,
    step_workspace_bytes,
    up_offload_layers,
)
from forge.train.recompute import _copies_in_flight as copies_in_flight

# Llama-3.1-8B's shape: the numbers a user of an 80 GB card sees.
LLAMA_8B = LlamaConfig(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8
)
GIB = 2**30
LORA_8B = 41_943_040  # r 16 on all seven projections


DEQUANTIZED_8B = 2 * 218_103_808  # one layer's seven projections in bf16


def plan(setting, tokens, free, can_offload=True, dequantized=0, fused=True):
    return plan_recompute(setting, LLAMA_8B, tokens, 2, LORA_8B, free, fused, can_offload, dequantized)


def test_layer_estimate_of_the_fused_path_for_llama_8b():
    # 4h + 3q + 2kv + 2i = 59,392 values a token, bf16
    assert layer_activation_bytes(LLAMA_8B, 4096, 2, fused=True) == 4096 * 59_392 * 2
    assert layer_input_bytes(LLAMA_8B, 4096, 2) == 4096 * 4096 * 2


def test_auto_keeps_everything_when_it_fits():
    p = plan("auto", 4096, free=62 * GIB)  # 2 x 2048 tokens on an 80 GB card after 16 GB of weights
    assert (p.mode, p.recompute, p.offload) == ("none", (), False)
    assert "GiB free" in p.reason


def test_auto_spends_spare_memory_on_dequantized_weights_then_on_glu_outputs():
    tokens = 4096
    fixed = step_workspace_bytes(LLAMA_8B, tokens, 2, LORA_8B)
    kept = 32 * layer_activation_bytes(LLAMA_8B, tokens, 2, True)
    glu = glu_output_bytes(LLAMA_8B, tokens, 2)
    assert glu == 4096 * 14336 * 2

    def free_for(spare):  # the free memory that leaves `spare` bytes once every layer keeps its activations
        return (fixed + kept + spare) / HEADROOM

    roomy = plan("auto", tokens, free_for(32 * DEQUANTIZED_8B + 32 * glu + GIB), dequantized=DEQUANTIZED_8B)
    assert (roomy.mode, roomy.dequantized, roomy.glu_kept) == ("none", tuple(range(32)), tuple(range(32)))
    assert "spare memory keeps the dequantized 4-bit weights of 32 layers and the GLU outputs of 32" in roomy.line()
    tight = plan("auto", tokens, free_for(10.5 * DEQUANTIZED_8B), dequantized=DEQUANTIZED_8B)
    assert (len(tight.dequantized), len(tight.glu_kept)) == (10, 1)  # half a layer's weights: one GLU output
    sixteen_bit = plan("auto", tokens, free_for(5 * glu + 1))
    assert (sixteen_bit.dequantized, sixteen_bit.glu_kept) == ((), tuple(range(5)))
    # only auto spends it, only the fused path keeps GLU outputs, none when layers must recompute
    assert plan("none", tokens, free_for(40 * GIB), dequantized=DEQUANTIZED_8B).dequantized == ()
    assert plan("auto", tokens, free_for(40 * GIB), fused=False).glu_kept == ()
    partial = plan("auto", 16384, 62 * GIB, dequantized=DEQUANTIZED_8B)
    assert partial.mode == "partial" and (partial.dequantized, partial.glu_kept) == ((), ())


def test_auto_recomputes_only_the_layers_that_do_not_fit():
    tokens, free = 16384, 62 * GIB  # 2 x 8192 tokens: about 58 GiB of activations
    p = plan("auto", tokens, free)
    assert p.mode == "partial" and 0 < len(p.recompute) < 32
    assert p.recompute == tuple(range(32 - len(p.recompute), 32))  # the last layers recompute
    kept = 32 - len(p.recompute)
    fixed = step_workspace_bytes(LLAMA_8B, tokens, 2, LORA_8B)
    full, small = layer_activation_bytes(LLAMA_8B, tokens, 2, True), layer_input_bytes(LLAMA_8B, tokens, 2)
    use = fixed + kept * full + len(p.recompute) * small + full
    assert use <= HEADROOM * free < use + (full - small)  # as many kept layers as fit, and not one more


def test_auto_offloads_when_even_full_recomputation_does_not_fit():
    assert plan("auto", 4096, free=3.5 * GIB).mode == "full"
    p = plan("auto", 65536, free=12 * GIB)
    assert (p.mode, p.offload, len(p.recompute), p.up_offloaded) == ("offload", True, 32, tuple(range(32)))
    assert "(and the MLP's up-projection output of 32)" in p.line()
    assert plan("auto", 65536, free=12 * GIB, can_offload=False).mode == "full"


def test_explicit_settings_and_offload_without_a_gpu():
    assert plan("none", 10**6, free=GIB).recompute == ()
    assert len(plan("full", 16, free=80 * GIB).recompute) == 32
    p = plan("offload", 16, free=80 * GIB, can_offload=False)
    assert (p.mode, p.offload, p.up_offloaded) == ("full", False, ()) and "needs a CUDA device" in p.reason
    assert plan("offload", 16, free=80 * GIB).up_offloaded == tuple(range(32))
    with pytest.raises(ValueError, match="train.gradient_checkpointing: 'sometimes'"):
        plan("sometimes", 16, free=GIB)


def test_up_outputs_go_to_pinned_memory_as_far_as_the_link_keeps_pace():
    """H100 (2026-12-06): 55 GB/s and ~750 TFLOP/s carry every layer's 117 MiB at 2 x 2048 within the
    forward; a link half as fast carries some layers' only, spread evenly (so the copies never pile up
    behind the forward), a slow one none: the last layer keeps its output on the device in every case."""
    h100 = up_offload_layers(LLAMA_8B, 4096, 2, LinkSpeed(55e9, 750e12))
    assert h100 == tuple(range(32))
    pcie4 = up_offload_layers(LLAMA_8B, 4096, 2, LinkSpeed(25e9, 750e12))
    assert 4 < len(pcie4) < 20 and pcie4[-1] == 31 and pcie4[0] == 0
    gaps = {b - a for a, b in zip(pcie4[:-1], pcie4[1:-1], strict=False)}
    assert gaps <= {2, 3, 4} and pcie4[-2] >= 26, pcie4  # about every third layer, up to the end
    assert up_offload_layers(LLAMA_8B, 4096, 2, LinkSpeed(1e9, 750e12)) == (31,)
    assert up_offload_layers(LLAMA_8B, 4096, 2, LinkSpeed(25e9, 200e12)) == tuple(range(32))  # slower GEMMs


def test_unknown_free_memory_keeps_everything():
    assert plan("auto", 4096, free=None).reason == "free memory unknown"


def lora_grads(model_dir, plan_layers: tuple[int, ...] | None, device: str = "cpu", offload: bool = False):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    if plan_layers is not None:
        p = plan_for_model(model, "full", 32, torch.device(device), 4)
        apply_recompute(model, type(p)(p.layers, plan_layers, offload, "test"))
        assert [layer.gradient_checkpointing for layer in decoder_layers(model)] == [
            i in plan_layers for i in range(len(decoder_layers(model)))
        ]
    calls = [0] * len(decoder_layers(model))
    for i, layer in enumerate(decoder_layers(model)):
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    model.train()
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids.to(device), labels=ids.to(device)).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, calls


def test_recomputing_some_layers_gives_the_same_gradients(tiny_llama_dir):
    reference, calls = lora_grads(tiny_llama_dir, None)
    partial, partial_calls = lora_grads(tiny_llama_dir, (1,))
    assert (calls, partial_calls) == ([1, 1], [1, 2])  # only layer 1 ran its forward again in the backward
    assert reference.keys() == partial.keys() and len(reference) > 0
    for name, grad in reference.items():
        torch.testing.assert_close(partial[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_plan_for_a_loaded_model_reads_its_config_and_free_memory(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert free_memory_bytes(torch.device("cpu")) > 0
    p = plan_for_model(model, "auto", 64, torch.device("cpu"), 4)
    assert (p.mode, p.layers) == ("none", 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_free_memory_stays_within_a_process_memory_cap():
    """A process capped with set_per_process_memory_fraction (a shared GPU; the benchmark's 24-GiB runs)
    plans within the cap, less what its allocator already holds."""
    device, index = torch.device("cuda"), torch.cuda.current_device()
    held = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    total = torch.cuda.mem_get_info(index)[1]
    try:
        torch.cuda.set_per_process_memory_fraction(0.25, index)
        capped = free_memory_bytes(device)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
    assert torch.cuda.memory_reserved(index) >= held.numel()
    assert capped == int(0.25 * total) - torch.cuda.memory_reserved(index)
    assert free_memory_bytes(device) > 0.5 * total  # no cap: what the device has free


def spare_memory_run(base: torch.nn.Module, dequantized: tuple[int, ...], glu_kept: tuple[int, ...]):
    """Two forward/backward passes of the patched LoRA model (CPU: the fused Functions with their PyTorch
    kernels) with the spare-memory choices given; the LoRA gradients of each pass, and the model."""
    torch.manual_seed(0)
    base.config.use_cache = False  # as forge.train loads it (with a cache the patched attention steps aside)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    patch_for_training(model, log=lambda _: None)
    p = plan_for_model(model, "none", 32, torch.device("cpu"), 4)
    apply_recompute(model, dataclasses.replace(p, dequantized=dequantized, glu_kept=glu_kept))
    model.train()
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(1))
    passes = []
    for _ in range(2):  # the second pass takes the kept dequantized weights
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        passes.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    return passes, model


@pytest.mark.parametrize("four_bit", [False, True], ids=["fp32", "nf4"])
def test_what_spare_memory_keeps_changes_no_gradient(tiny_llama_dir, nf4_base, four_bit):
    def base():
        return nf4_base(tiny_llama_dir) if four_bit else AutoModelForCausalLM.from_pretrained(tiny_llama_dir)

    reference, _ = spare_memory_run(base(), (), ())
    kept, model = spare_memory_run(base(), (0,) if four_bit else (), (1,))
    for before, after in zip(reference, kept, strict=True):
        assert before.keys() == after.keys() and len(before) == 28
        for name, grad in before.items():
            assert torch.equal(after[name], grad), name
    layers = decoder_layers(model)
    assert [getattr(layer.mlp, KEEP_GLU_OUTPUT, False) for layer in layers] == [False, True]
    if four_bit:  # layer 0's seven 4-bit projections hold their dequantized weight; layer 1's none
        caches = [[getattr(m, DENSE_CACHE, None) for m in four_bit_linears(layer)] for layer in layers]
        assert len(caches[0]) == 7 and all(c is not None and len(c) == 1 for c in caches[0])
        assert caches[1] == [None] * 7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned memory, copy stream)")
def test_an_offloading_plan_measures_the_link_for_the_up_outputs(tiny_llama_dir):
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir).to("cuda"), LoraConfig(r=4, target_modules="all-linear")
    )
    patch_for_training(model, log=lambda _: None)
    p = plan_for_model(model, "offload", 64, torch.device("cuda"), 2)
    assert p.offload and p.up_offloaded[-1] == 1 and "GB/s" in p.reason and "TFLOP/s" in p.reason
    assert plan_for_model(model, "full", 64, torch.device("cuda"), 2).up_offloaded == ()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned memory, copy stream)")
def test_offloaded_layers_give_the_same_gradients_on_gpu(tiny_llama_dir):
    reference, _ = lora_grads(tiny_llama_dir, None, "cuda")
    offloaded, calls = lora_grads(tiny_llama_dir, (0, 1), "cuda", offload=True)
    assert calls == [2, 2]
    for name, grad in reference.items():
        torch.testing.assert_close(offloaded[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def keep_gpu_busy(device: torch.device, ms: float = 5.0) -> None:
    """Queue about `ms` of bf16 matmuls on the current stream, so that what the host queues next waits."""
    a = torch.ones(4096, 4096, dtype=torch.bfloat16, device=device)
    out = torch.empty_like(a)
    for _ in range(int(ms / 0.2)):
        torch.mm(a, a, out=out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned memory, copy stream)")
def test_host_copies_are_exact_while_their_memory_is_reused():
    """Copies to pinned memory and back on the side stream, the host far ahead of the GPU, and every freed
    block reused at once for a write on the compute stream: what comes back is what went out. Without the
    streams' waits the writes overwrite a source before its copy out reads it (forward), or a copy back's
    destination after it arrived (backward)."""
    device = torch.device("cuda")
    n = 32 * 2**20  # 64 MiB of bf16, about 1 ms over PCIe: far slower than a write of the same memory
    torch.cuda.synchronize()
    copies = []
    for i in range(6):  # the forward of six layers: one copy out each
        copies_in_flight(device).next_layer()
        keep_gpu_busy(device, 1.0)
        source = torch.full((n,), float(i), dtype=torch.bfloat16, device=device)
        copies.append(HostCopy(source))
        del source
        torch.empty(n, dtype=torch.bfloat16, device=device).fill_(-1.0)  # a freed source's block, if free
    copies_in_flight(device).release_all()
    for i in reversed(range(6)):  # the backward: copies back into blocks whose last write is still queued
        keep_gpu_busy(device)
        torch.empty(n, dtype=torch.bfloat16, device=device).fill_(-2.0)
        copies[i].prefetch()
        back = copies[i].take()
        torch.empty(n, dtype=torch.bfloat16, device=device).fill_(-3.0)
        assert torch.equal(back.unique().cpu(), torch.tensor([float(i)], dtype=torch.bfloat16)), i
