"""Patched models compute what transformers + PEFT compute, on CPU with the Triton kernels interpreted.

Tiny random models (hidden 64, 2 layers, head_dim 16, vocab 128) in fp32 on a packed batch of 2 x 16 tokens
(position ids restarting, forge.data's block-causal 4-D mask, prompt tokens masked, padding). Each test
takes the unpatched model's loss and gradients first, then patches the same model and compares.

Tolerances (fp32): loss |a - b| / |ref| < 1e-5; each trainable parameter's gradient
max|a - b| / max|ref| < 1e-5 (observed <= 3e-6: the fused path sums the same products in another order).
The autograd graph of every fused-path loss is checked to hold the fused Functions, so a patch that
silently fell back to the reference could not pass.
"""

import contextlib
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from forge.kernels._device import use_triton
from transformers import GPT2Config, LlamaForCausalLM

from forge.models.loss import causal_lm_loss
from forge.models.patching import PARTS, patch_for_training
from forge.train.loss import shifted_targets


def _load_tiny_models():
    spec = importlib.util.spec_from_file_location("tiny_models", Path(__file__).with_name("tiny_models.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tm = _load_tiny_models()
TOL = 1e-5
BATCH = tm.packed_batch(vocab=128, seq=16)
# RMSNorm modules per family at 2 layers: 2 per layer + the final one, + q/k norms (Qwen3, Gemma3),
# + the pre/post feed-forward norms (Gemma2, Gemma3).
# On a CUDA machine the interpreter is off (conftest sets it only without CUDA), so CPU tensors take the PyTorch
# paths: the tests that check the fused Functions on CPU skip there; test_patching_gpu.py covers CUDA.
cpu_kernels = pytest.mark.skipif(
    not use_triton(torch.empty(0)), reason="the fused path on CPU tensors needs TRITON_INTERPRET=1"
)
NORMS = {"llama": 5, "mistral": 5, "qwen2": 5, "qwen3": 9, "gemma": 5, "gemma2": 9, "gemma3_text": 13}
# Adapter variations that the fused path supports, spread over the families.
LORA_OPTIONS = {
    "mistral": {"target_modules": ["q_proj", "v_proj", "up_proj"]},  # untargeted projections: plain frozen
    "qwen2": {"use_rslora": True},  # scaling alpha / sqrt(r); Qwen2 also has q/k/v biases
}


def _loss_and_grads(model, batch=BATCH, normalizer=None):
    loss = causal_lm_loss(model, batch, normalizer)
    loss.backward()
    return loss.detach(), tm.lora_grads(model)


def _assert_same(loss, grads, ref_loss, ref_grads):
    assert abs(loss - ref_loss) / abs(ref_loss) < TOL, (float(loss), float(ref_loss))
    assert grads.keys() == ref_grads.keys()
    errors = {name: tm.rel_err(grads[name], ref_grads[name]) for name in ref_grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOL, f"{worst}: gradient error {errors[worst]:.3g}"


@cpu_kernels
@pytest.mark.parametrize("family", list(tm.FAMILIES))
def test_patched_lora_model_matches_peft(family):
    model = tm.add_lora(tm.random_model(tm.tiny_config(family)), **LORA_OPTIONS.get(family, {}))
    ref_loss, ref_grads = _loss_and_grads(model)

    report = patch_for_training(model)
    assert report.family == family and report.reference == {}
    assert len(report.patched["rms_norm"]) == NORMS[family]
    for part in ("rope", "lora_qkv", "lora_o", "lora_mlp"):
        assert len(report.patched[part]) == 2, part
    assert report.patched["cross_entropy"]
    loss = causal_lm_loss(model, BATCH)
    assert tm.FUSED_FUNCTIONS.issubset(tm.graph_functions(loss))
    loss.backward()
    _assert_same(loss.detach(), tm.lora_grads(model), ref_loss, ref_grads)


def _nf4_llama(folder):
    """A tiny Llama quantized to NF4 (double-quantized) by bitsandbytes on load, fp32 compute."""
    from transformers import AutoModelForCausalLM

    from forge.train.model import qlora_quantization

    # Every dimension a multiple of 64: bitsandbytes' CPU dequantization misplaces blocks for other shapes.
    tm.random_model(tm.tiny_config("llama", kv_heads=4)).save_pretrained(folder)
    nf4 = qlora_quantization(torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=nf4, device_map={"": "cpu"})
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == "Params4bit"
    return model


@cpu_kernels
def test_qlora_4bit_llama_matches_peft(tmp_path):
    from forge.train.model import keep_4bit_trainable

    base = _nf4_llama(tmp_path)
    keep_4bit_trainable(base)
    model = tm.add_lora(base)
    ref_loss, ref_grads = _loss_and_grads(model)

    report = patch_for_training(model)
    assert report.reference == {} and len(report.patched["lora_mlp"]) == 2
    loss = causal_lm_loss(model, BATCH)
    assert tm.FUSED_FUNCTIONS.issubset(tm.graph_functions(loss))
    loss.backward()
    _assert_same(loss.detach(), tm.lora_grads(model), ref_loss, ref_grads)


def test_4bit_weights_repacked_for_the_cpu_kernel_are_not_read_as_nf4(tmp_path):
    model = tm.add_lora(_nf4_llama(tmp_path)).eval()
    with torch.no_grad():
        ref_loss = causal_lm_loss(model, BATCH)  # on AVX512-BF16 CPUs, bitsandbytes repacks the weights here
    if not getattr(model.base_model.model.model.layers[0].mlp.up_proj.weight.quant_state, "packing_format_for_cpu", 0):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes keeps its packed format")

    report = patch_for_training(model)
    assert len(next(names for reason, names in report.reference.items() if "repacked" in reason)) == 2 * 7
    with torch.no_grad():
        assert abs(causal_lm_loss(model, BATCH) - ref_loss) / ref_loss < TOL


def test_eval_logits_and_generation_are_unchanged():
    model = tm.add_lora(tm.random_model(tm.tiny_config("llama")))
    prompt = BATCH["input_ids"][:1, :6]
    with torch.no_grad():
        ref_loss = causal_lm_loss(model, BATCH)
        ref_logits = model(input_ids=BATCH["input_ids"]).logits
        ref_tokens = model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)

    patch_for_training(model)
    assert patch_for_training(model).patched == {part: [] for part in PARTS}  # a second call: no-op
    with torch.no_grad():
        assert abs(causal_lm_loss(model, BATCH) - ref_loss) / ref_loss < TOL
        out = model(input_ids=BATCH["input_ids"], labels=BATCH["labels"])
        assert out.logits is None and out.loss is not None  # with labels: fused loss, no logits
        logits = model(input_ids=BATCH["input_ids"]).logits  # without labels: logits as before
        assert tm.rel_err(logits, ref_logits) < TOL
        assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False), ref_tokens)


def test_gradient_accumulation_with_normalizer_is_exact():
    model = tm.add_lora(tm.random_model(tm.tiny_config("llama")))
    full_loss, full_grads = _loss_and_grads(model)  # unpatched, the mean over both rows

    patch_for_training(model)

    targets = int((shifted_targets(BATCH) != -100).sum())
    total, summed = 0.0, {}
    for row in range(2):
        micro = {key: value[row : row + 1] for key, value in BATCH.items()}
        loss, grads = _loss_and_grads(model, micro, normalizer=targets)
        total += loss
        summed = {n: summed.get(n, 0) + g for n, g in grads.items()}
    _assert_same(total, summed, full_loss, full_grads)


@pytest.mark.parametrize("kept", [False, True], ids=["step", "loop"])
def test_patched_model_trains_step_by_step_as_peft(kept):
    """Three optimizer steps of the training step (two micro-batches each), alone or inside the loop's
    `step_copies` block: every step's loss equals the unpatched model's, so the adapters' compute copies
    that the fused path keeps (within a step, or from step to step) follow every optimizer update."""
    from forge.train.loop import step_copies, train_step
    from forge.train.precision import Precision

    micro = [{key: value[row : row + 1] for key, value in BATCH.items()} for row in range(2)]
    losses = {}
    for patched in (False, True):
        model = tm.add_lora(tm.random_model(tm.tiny_config("llama")))  # scaling 2: s B is a copy
        if patched:
            patch_for_training(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, fused=True)
        cpu, fp32 = torch.device("cpu"), Precision("fp32")
        with step_copies() if kept else contextlib.nullcontext():
            losses[patched] = [train_step(model, micro, optimizer, None, None, fp32, cpu).values()[0] for _ in range(3)]
    assert losses[False][0] - losses[False][2] > 0.01  # the steps moved the adapters
    for got, ref in zip(losses[True], losses[False], strict=True):
        assert abs(got - ref) / ref < TOL, (losses[True], losses[False])


RECOMPUTE_SETTINGS = [
    pytest.param("full", "cpu", 2, id="full"),
    pytest.param(  # more layers than recompute.HELD_LAYERS: sources of finished copies are freed mid-forward
        "offload",
        "cuda",
        6,
        id="offload",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned memory)"),
    ),
]


@pytest.mark.parametrize(("setting", "device", "layers"), RECOMPUTE_SETTINGS)
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_recomputed_layers_give_the_same_gradients_without_the_thrown_away_mlp_output(
    family, setting, device, layers, monkeypatch
):
    """Every decoder layer recomputed in the backward (`full`: torch.utils.checkpoint; `offload`: inputs in
    pinned memory): the same loss and gradients bit for bit as keeping the activations. Where the MLP's
    output goes straight into the residual add (Llama) the recomputation skips the down projection; where a
    norm reads it (Gemma3) it does not. With `offload` the recomputation also skips the up projection (its
    output was kept in pinned memory)."""
    import forge.kernels.lora as lora

    from forge.train.recompute import apply_recompute, plan_for_model

    inputs, outputs = [], []  # input widths of the projection groups run forward; output widths of frozen GEMMs
    real, real_out = lora._shared_fwd, lora._proj_out
    monkeypatch.setattr(lora, "_shared_fwd", lambda x2, *a: inputs.append(x2.shape[1]) or real(x2, *a))
    monkeypatch.setattr(lora, "_proj_out", lambda x2, p, *a: outputs.append(p.weight.shape[0]) or real_out(x2, p, *a))
    config = tm.tiny_config(family, layers=layers)
    runs = []
    for plan in ("none", setting):
        model = tm.add_lora(tm.random_model(config)).to(device)
        patch_for_training(model, log=lambda _: None)
        p = plan_for_model(model, plan, 32, torch.device(device), 4)
        # offload: every layer's up output kept aside (in pinned memory, the last layer's on the device),
        # whatever this GPU's link would carry at this size
        apply_recompute(model, dataclasses.replace(p, up_offloaded=tuple(range(layers))) if p.offload else p)
        inputs.clear(), outputs.clear()
        loss, grads = _loss_and_grads(model)
        runs.append((loss, grads, inputs.count(config.intermediate_size), outputs.count(config.intermediate_size)))
    (loss, grads, downs, gate_ups), (loss_r, grads_r, downs_r, gate_ups_r) = runs
    assert (downs, downs_r) == (layers, layers if family == "llama" else 2 * layers)  # down projections run
    assert (gate_ups, gate_ups_r) == (2 * layers, (3 if setting == "offload" else 4) * layers)  # gate and up GEMMs
    assert torch.equal(loss, loss_r) and grads.keys() == grads_r.keys()
    for name, grad in grads.items():
        assert torch.equal(grads_r[name], grad), name


@cpu_kernels
def test_only_batches_without_positions_or_mask_skip_the_packed_sequence_check(monkeypatch):
    """transformers checks the position ids for packed sequences with a host sync every forward; the patched
    loss forward answers it for batches without position ids and mask (the model numbers them 0..n-1) and
    leaves it to transformers otherwise. The losses stay the unpatched model's either way."""
    import transformers.masking_utils as masking

    config = tm.tiny_config("llama")
    config.use_cache = False  # as forge.train loads it (transformers skips the check when it makes a cache)
    reference = tm.add_lora(tm.random_model(config))
    model = tm.add_lora(tm.random_model(config))
    model.load_state_dict(reference.state_dict())
    patch_for_training(model, log=lambda _: None)
    checks = []
    real = masking.find_packed_sequence_indices._forge_original
    monkeypatch.setattr(
        masking.find_packed_sequence_indices, "_forge_original", lambda pos: checks.append(pos) or real(pos)
    )
    plain = {"input_ids": BATCH["input_ids"], "labels": BATCH["labels"]}
    packed = {**plain, "position_ids": BATCH["position_ids"]}  # row 0 restarts its positions: two sequences
    for batch, expected_checks in ((plain, 0), (packed, 1)):
        checks.clear()
        with torch.no_grad():
            loss = model(**batch).loss
            assert len(checks) == expected_checks
            ref = reference(**batch).loss  # the unpatched model: transformers' check, every time
            assert len(checks) == expected_checks + 1
        assert abs(loss - ref) / ref < TOL, (float(loss), float(ref))
    assert real(checks[0]) is not None  # the packed batch was seen as packed


def test_unpatched_loss_is_next_token_cross_entropy_within_examples():
    model = tm.random_model(tm.tiny_config("llama"))
    mask = BATCH["attention_mask"]
    with torch.no_grad():
        additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        logits = model(input_ids=BATCH["input_ids"], position_ids=BATCH["position_ids"], attention_mask=additive).logits
        expected = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), shifted_targets(BATCH).flatten(), reduction="sum"
        )
        assert abs(causal_lm_loss(model, BATCH, normalizer=1) - expected) / expected < TOL


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"lora_dropout": 0.1}, "lora_dropout 0.1 > 0"),
        ({"use_dora": True}, "DoRA or another LoRA variant"),
        ({"lora_bias": True}, "lora_bias"),
        ({"target_modules": ["q_proj", "down_proj", "lm_head"]}, "loss: lm_head is peft.tuners.lora.layer.Linear"),
    ],
)
def test_unsupported_options_stay_on_the_reference_path(options, reason):
    model = tm.add_lora(tm.random_model(tm.tiny_config("llama")), **options)
    torch.manual_seed(5)  # dropout draws the same masks in both runs: the projections run in the same order
    ref_loss, ref_grads = _loss_and_grads(model)

    report = patch_for_training(model)
    assert any(r.startswith(reason) for r in report.reference), report.reference
    assert len(report.patched["rms_norm"]) == 5 and len(report.patched["rope"]) == 2
    torch.manual_seed(5)
    loss, grads = _loss_and_grads(model)
    _assert_same(loss, grads, ref_loss, ref_grads)


def test_disabled_and_merged_adapters_fall_back_at_call_time():
    model = tm.add_lora(tm.random_model(tm.tiny_config("llama")))
    with torch.no_grad():
        with model.disable_adapter():
            ref_disabled = causal_lm_loss(model, BATCH)
        model.merge_adapter()
        ref_merged = causal_lm_loss(model, BATCH)
        model.unmerge_adapter()

    assert patch_for_training(model).reference == {}
    with torch.no_grad():
        with model.disable_adapter():
            assert abs(causal_lm_loss(model, BATCH) - ref_disabled) / ref_disabled < TOL
        model.merge_adapter()
        assert abs(causal_lm_loss(model, BATCH) - ref_merged) / ref_merged < TOL


@cpu_kernels
def test_full_finetune_keeps_projections_on_reference_and_fuses_the_rest():
    model = tm.random_model(tm.tiny_config("llama"))
    assert isinstance(model, LlamaForCausalLM)
    ref_loss, ref_grads = _loss_and_grads(model)  # every weight: norms, embeddings, lm_head, projections

    report = patch_for_training(model)
    assert len(report.reference["trainable base weight"]) == 2 * 7
    assert len(report.patched["glu"]) == 2 and len(report.patched["rms_norm"]) == 5
    loss = causal_lm_loss(model, BATCH)
    functions = tm.graph_functions(loss)
    assert {"RMSNormFunctionBackward", "FusedLinearCrossEntropyFunctionBackward"} <= functions
    assert "LoRAMLPFunctionBackward" not in functions
    loss.backward()
    _assert_same(loss.detach(), tm.lora_grads(model), ref_loss, ref_grads)


def test_unsupported_architecture_is_left_alone():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4))
    report = patch_for_training(model)
    assert report.family is None and not any(report.patched.values())
    assert "model_type 'gpt2' has no patch" in report.lines()[1]
