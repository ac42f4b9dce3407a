"""base.model resolution (builtin, GGUF, folder, Hub cache) and the normalized HF folder it becomes."""

import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from forge.models.normalize import normalize_base
from forge.models.resolve import BaseModelError, resolve_base


def _greedy(model, tokenizer, prompt: str, n: int = 24) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return out[0, ids["input_ids"].shape[1] :].tolist()


def test_builtin_gguf_becomes_a_folder_that_answers_like_the_gguf(smollm2_hf_dir, smollm2_gguf):
    direct = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    direct_tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    folder = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir)
    folder_tok = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    assert folder_tok.chat_template == direct_tok.chat_template
    assert sorted(p.name for p in smollm2_hf_dir.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(smollm2_hf_dir.glob("*.bin")) and not list(smollm2_hf_dir.glob("*.gguf"))
    prompt = "What is the capital of France?"
    answer = _greedy(folder, folder_tok, prompt)
    assert answer == _greedy(direct, direct_tok, prompt)
    assert "Paris" in folder_tok.decode(answer)


def test_local_folder_keeps_weights_and_tokenizer(tmp_path, smollm2_hf_dir):
    src = tmp_path / "tiny"
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(src)
    AutoTokenizer.from_pretrained(smollm2_hf_dir).save_pretrained(src)
    out = tmp_path / "out"
    facts = normalize_base(resolve_base(str(src)), out)
    assert facts["dtype"] == "bfloat16" and facts["how"] == "copied safetensors"
    a = AutoModelForCausalLM.from_pretrained(src)
    b = AutoModelForCausalLM.from_pretrained(out)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert AutoTokenizer.from_pretrained(out).chat_template
    facts = normalize_base(resolve_base(str(src)), tmp_path / "f32", dtype="float32")
    assert facts["dtype"] == "float32"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "f32").dtype == torch.float32


def test_hub_id_missing_from_cache_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    started = time.time()
    with pytest.raises(BaseModelError, match=r"'someone/model' is not in the local Hugging Face cache"):
        resolve_base("someone/model")
    assert time.time() - started < 10


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("builtin:nope", r"unknown builtin 'builtin:nope'"),
        ("missing.gguf", r"GGUF file .*missing\.gguf not found"),
        ("not a model", r"not a folder, a \.gguf file, a builtin or a Hub id"),
    ],
)
def test_bad_references_say_why(tmp_path, ref, message):
    with pytest.raises(BaseModelError, match=message):
        resolve_base(ref, root=tmp_path)


def test_folder_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(BaseModelError, match=r"has no config\.json"):
        resolve_base(str(tmp_path / "m"))
