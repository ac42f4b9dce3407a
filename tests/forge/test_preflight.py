"""Pre-flight checks on tiny random models with small word-level tokenizers, and `forge run` / `forge check`
stopping before training on a model the GGUF converter cannot take."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from forge.config import load_config
from forge.data.encoding import encode
from forge.data.templating import render_chat
from forge.preflight import (
    MERGE_BASELINE,
    check_chat_template,
    check_double_bos,
    check_merge_memory,
    check_vocabulary,
    dataset_is_conversational,
    planned_bytes,
    read_weights,
    run_checks,
)

FORGE = str(Path(sys.executable).parent / "forge")
WORDS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<|im_start|>", "<|im_end|>", "user", "assistant",
         "Hello", "Hi", "there"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
# Llama 3's layout: the template writes BOS and the tokenizer adds one to plain text.
BOS_ONCE = "{{ bos_token }}" + CHATML
# A Llama 2 style template that writes BOS before every user turn, plus once more up front.
BOS_TWICE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}{{ bos_token }}[INST] {{ m.content }} [/INST]"
    "{% else %} {{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
)
CONVERSATION = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}]


def word_tokenizer(template: str | None, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over WORDS (BOS <s>, EOS </s>) that adds BOS to plain text when add_bos."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]", "<|im_start|>", "<|im_end|>"]})
    fast.chat_template = template
    return fast


def model_folder(folder: Path, kind: str = "llama", template: str | None = CHATML, vocab: int = len(WORDS)) -> Path:
    """A tiny random model (llama or gpt2) with a word tokenizer, saved as an HF folder."""
    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
        LlamaForCausalLM(config).save_pretrained(folder)
    else:
        config = GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=1,
                            eos_token_id=2)
        GPT2LMHeadModel(config).save_pretrained(folder)
    word_tokenizer(template).save_pretrained(folder)
    return folder


def write_project(root: Path, model: Path, rows: list[dict[str, Any]]) -> Path:
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"base": {"model": str(model)}, "data": {"path": "data.jsonl", "eval_fraction": 0.0}}
    (root / "forge.yaml").write_text(json.dumps(config))
    return root / "forge.yaml"


def forge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "400"}  # one message, one line
    return subprocess.run([FORGE, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_an_unsupported_architecture_fails_in_preflight_before_training(tmp_path: Path) -> None:
    model = model_folder(tmp_path / "gpt2", kind="gpt2")
    write_project(tmp_path, model, [{"messages": CONVERSATION}] * 4)
    run_dir = tmp_path / "runs" / "default"

    result = forge("run", cwd=tmp_path)
    assert result.returncode == 1
    assert "pre-flight check 'architecture' failed: GPT2LMHeadModel is not supported by the GGUF converter" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert (run_dir / "base" / "manifest.json").is_file()
    assert not (run_dir / "train").exists() and not (run_dir / "data").exists()

    check = forge("check", cwd=tmp_path)
    assert check.returncode == 1 and "✗ architecture" in check.stdout and "✓ vocabulary" in check.stdout

    cheap = forge("run", "--to", "data", cwd=tmp_path)  # no expensive stage: no pre-flight
    assert cheap.returncode == 0, cheap.stderr
    assert (run_dir / "data" / "manifest.json").is_file() and "architecture" not in cheap.stdout


def test_a_template_that_doubles_bos_is_caught(tmp_path: Path) -> None:
    twice = word_tokenizer(BOS_TWICE)
    # what the data stage would train on: two BOS tokens before the first [INST]
    ids = encode(twice, [render_chat(twice, CONVERSATION, "responses", "x")])[0].input_ids
    assert ids[:3] == [1, 1, 3]
    failed = check_double_bos(twice)
    assert not failed.ok and "writes BOS '<s>' 2 times" in failed.message and "{{ bos_token }}" in failed.message

    once = check_double_bos(word_tokenizer(BOS_ONCE))  # the tokenizer's own BOS is not added to templated text
    assert once.ok and "tokenized without added special tokens" in once.message
    assert check_double_bos(word_tokenizer(CHATML)).ok

    model = model_folder(tmp_path / "llama", template=BOS_TWICE)
    write_project(tmp_path, model, [{"messages": CONVERSATION}])
    results = {c.name: c for c in run_checks(load_config(tmp_path / "forge.yaml"), model, {"train"}, every=True)}
    assert not results["double BOS"].ok
    assert [n for n, c in results.items() if not c.ok] == ["double BOS"]


def test_the_disk_check_compares_the_planned_outputs_with_the_free_bytes(tmp_path: Path) -> None:
    model = model_folder(tmp_path / "llama")
    loaded = load_config(write_project(tmp_path, model, [{"messages": CONVERSATION}]))
    weights = read_weights(model)
    planned = {"train", "merge", "gguf", "quantize"}
    need = planned_bytes(weights, loaded.config, planned)
    assert need["merge"] == int(weights.bytes * 1.1)  # the merged model in the base's fp32
    assert need["gguf"] == int(weights.params * 2 * 1.1)  # f16
    # LoRA r 16 on q, k, v, o (16x16, 8x16, 8x16, 16x16) and gate, up, down (32x16, 32x16, 16x32) of 2 layers:
    # 8,192 fp32 parameters, written as the adapter and two checkpoints of weights + AdamW moments
    assert need["train"] == int(4 * 8192 * 7 * 1.1)
    assert set(planned_bytes(weights, loaded.config, {"quantize"})) == {"quantize"}

    enough = {c.name: c for c in run_checks(loaded, model, planned, free_bytes=sum(need.values()))}["disk"]
    assert enough.ok
    short = {c.name: c for c in run_checks(loaded, model, planned, free_bytes=sum(need.values()) - 1)}["disk"]
    assert not short.ok and "export.quants" in short.message and "free at" in short.message


def test_adapter_mode_adds_the_base_and_adapter_ggufs_to_the_gguf_estimate(tmp_path: Path) -> None:
    model = model_folder(tmp_path / "llama")
    path = write_project(tmp_path, model, [{"messages": CONVERSATION}])
    weights = read_weights(model)
    merged = planned_bytes(weights, load_config(path).config, {"gguf"})
    adapter = planned_bytes(weights, load_config(path, ["ollama.mode=adapter"]).config, {"gguf", "quantize"})
    # the merged and the base GGUF (P parameters each) and the adapter GGUF (8,192 LoRA parameters, as in the
    # test above), all f16; quantize is made from the merged model only
    assert merged["gguf"] == int(weights.params * 2 * 1.1)
    assert adapter["gguf"] == int((2 * weights.params + 8192) * 2 * 1.1)
    assert adapter["quantize"] == planned_bytes(weights, load_config(path).config, {"quantize"})["quantize"]
    f32 = planned_bytes(weights, load_config(path, ["ollama.mode=adapter", "export.dtype=f32"]).config, {"gguf"})
    assert f32["gguf"] == int((2 * weights.params + 8192) * 4 * 1.1)


def test_checks_of_stages_that_will_not_run_are_skipped(tmp_path: Path) -> None:
    model = model_folder(tmp_path / "llama", template=BOS_TWICE)
    loaded = load_config(write_project(tmp_path, model, [{"messages": CONVERSATION}]))
    results = {c.name: c for c in run_checks(loaded, model, {"quantize"})}  # train and merge cached
    assert results["double BOS"].skipped and results["merge memory"].skipped and results["chat template"].skipped
    assert not results["architecture"].skipped and not results["disk"].skipped
    assert all(c.ok for c in results.values())


def test_a_tokenizer_larger_than_the_embedding_is_refused() -> None:
    tokenizer = word_tokenizer(CHATML)
    assert check_vocabulary(tokenizer, {"vocab_size": len(WORDS)}).ok
    failed = check_vocabulary(tokenizer, {"vocab_size": len(WORDS) - 2})
    assert not failed.ok and "resize_token_embeddings" in failed.message and "10 rows" in failed.message
    assert check_vocabulary(tokenizer, {"text_config": {"vocab_size": 64}}).ok  # multimodal configs


def test_conversation_data_needs_a_chat_template(tmp_path: Path) -> None:
    loaded = load_config(write_project(tmp_path, tmp_path, [{"messages": CONVERSATION}]))
    assert dataset_is_conversational(loaded)
    failed = check_chat_template(word_tokenizer(None), True)
    assert not failed.ok and "data.format=text" in failed.message
    assert check_chat_template(word_tokenizer(None), False).skipped
    (tmp_path / "data.jsonl").write_text(json.dumps({"text": "Hello there"}) + "\n")
    assert not dataset_is_conversational(loaded)


@pytest.mark.parametrize(("available", "ok"), [(2 * MERGE_BASELINE, True), (MERGE_BASELINE // 2, False)])
def test_merge_memory_is_compared_with_what_is_available(available: int, ok: bool) -> None:
    result = check_merge_memory(MERGE_BASELINE, available)
    assert result.ok is ok and ("available" in result.message)
