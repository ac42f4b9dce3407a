"""Provenance end to end on a tiny model: the real base, data, merge, gguf and quantize stages (a fixture stands
in for training), the GGUFs read back with gguf.GGUFReader, `forge plan` after a dataset edit, the model card."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from forge.config import load_config
from forge.hub import CardFacts, render_model_card
from forge.models.resolve import resolve_base
from forge.pipeline import Change, Pipeline, Stage, StageContext, read_manifest, sha256_file
from forge.provenance import (
    CARD_KEYS,
    base_gguf_metadata,
    base_record,
    card_rows,
    hub_snapshot,
    read_gguf_strings,
    sha256_lines,
)
from forge.stages.base import BaseStage
from forge.stages.data import DataStage
from forge.stages.gguf import GgufStage
from forge.stages.merge import MergeStage
from forge.stages.quantize import QuantizeStage

FORGE = str(Path(sys.executable).parent / "forge")
SMALL_VOCAB = 4096
VERSIONS = {
    "transformers": transformers.__version__,
    "torch": torch.__version__,
    "peft": metadata.version("peft"),
    "gguf": metadata.version("gguf"),
    "llama_cpp_python": metadata.version("llama-cpp-python"),
}


class FullFineTune(Stage):
    """Stands in for the train stage (same name, version, needs and config keys, so the same fingerprint): a
    'full fine-tune' whose weights are the base's."""

    name, version, needs, config_keys = "train", 1, ("base", "data"), ("train",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        shutil.copytree(ctx.inputs["base"] / "model", ctx.out / "model")
        (ctx.out / "train_stats.json").write_text(json.dumps({"method": "full", "steps": 0}))
        return {"line": "weights passed through"}


class TrainedLora(Stage):
    """Stands in for the train stage in LoRA mode: a PEFT LoRA on every linear layer, lora_B non-zero."""

    name, version, needs, config_keys = "train", 1, ("base", "data"), ("train",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg = ctx.config.train
        model = AutoModelForCausalLM.from_pretrained(ctx.inputs["base"] / "model", dtype=torch.float32)
        torch.manual_seed(0)
        lora = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear"))
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.03)
        lora.save_pretrained(ctx.out / "adapter")
        (ctx.out / "train_stats.json").write_text(json.dumps({"method": cfg.method}))
        return {"line": "fixture adapter"}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer (read from the builtin GGUF) cut to its first 4096 tokens
    (BPE merges build later tokens from earlier ones, so the cut is a valid tokenizer) and its chat template."""
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    shipped = resolve_base("builtin:smollm2-135m-instruct").path
    tokenizer = AutoTokenizer.from_pretrained(shipped.parent, gguf_file=shipped.name)
    tokenizer.save_pretrained(out)
    spec = json.loads((out / "tokenizer.json").read_text())
    spec["model"]["vocab"] = {t: i for t, i in spec["model"]["vocab"].items() if i < SMALL_VOCAB}
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if "".join(m) in spec["model"]["vocab"]]
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["id"] < SMALL_VOCAB]
    (out / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(out)
    return out


def rows(n: int, answer: str = "{s}") -> str:
    return "".join(
        json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                 {"role": "assistant", "content": answer.format(s=2 * i)}]}) + "\n"
        for i in range(n)
    )


def pipeline(root: Path, *overrides: str) -> Pipeline:
    return Pipeline(
        load_config(root / "forge.yaml", list(overrides)),
        [BaseStage(), DataStage(), FullFineTune(), MergeStage(), GgufStage(), QuantizeStage()],
        log=lambda _: None,
    )


def fields(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def test_the_ggufs_carry_provenance_and_a_dataset_edit_is_planned_and_makes_a_new_gguf(tiny_base, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(rows(12))
    config = {"base": {"model": str(tiny_base)}, "data": {"path": "data.jsonl"}, "export": {"quants": ["q8_0"]}}
    (tmp_path / "forge.yaml").write_text(json.dumps(config))
    pipe = pipeline(tmp_path)
    pipe.run("quantize")
    run_dir = pipe.run_dir

    f16, q8 = fields(run_dir / "gguf" / "model-f16.gguf"), fields(run_dir / "quantize" / "model-q8_0.gguf")
    data_sha = hashlib.sha256(f"{sha256_file(data)}  data.jsonl\n".encode()).hexdigest()  # sha256sum | sha256sum
    assert f16["forge.dataset.sha256"] == data_sha
    assert json.loads(f16["forge.dataset.files"]) == {"data.jsonl": sha256_file(data)}
    assert f16["general.dataset.count"] == 1 and f16["general.dataset.0.name"] == "data.jsonl"
    assert f16["forge.version"] == metadata.version("forge-llm")
    assert {k: f16[f"forge.versions.{k}"] for k in VERSIONS} == VERSIONS
    base_files = {p.name: sha256_file(p) for p in tiny_base.iterdir()}
    assert f16["forge.base.sha256"] == sha256_lines(base_files)
    assert json.loads((run_dir / "base" / "base.json").read_text())["files"] == base_files
    assert f16["general.base_model.count"] == 1 and f16["general.base_model.0.name"] == "tiny-llama"
    assert f16["forge.base.model"] == "tiny-llama"  # a local path by its name only
    template = f16["tokenizer.chat_template"]
    assert f16["forge.chat_template.sha256"] == hashlib.sha256(template.encode()).hexdigest()
    train = json.loads(f16["forge.train_config"])
    assert train["method"] == "lora" and train["lr"] == 0.0002
    # llama.cpp's quantizer copies every key: the q8_0 file says the same
    provenance = {k: v for k, v in f16.items() if k.startswith(CARD_KEYS)}
    assert len(provenance) >= 18
    assert {k: q8[k] for k in provenance} == provenance
    assert (f16["general.file_type"], q8["general.file_type"]) == (1, 7)
    assert not any(str(tmp_path) in str(v) for v in provenance.values())  # no local path

    # the card shows what the GGUF says
    card_keys = read_gguf_strings(run_dir / "quantize" / "model-q8_0.gguf", prefixes=CARD_KEYS)
    assert card_keys == {k: v for k, v in provenance.items() if isinstance(v, str)}
    table, train_json = card_rows(card_keys)
    card = render_model_card(CardFacts(repo="me/tiny", provenance=table, train_config=train_json))
    assert f"| dataset sha256 | `{data_sha}` |" in card and f"| transformers | {transformers.__version__} |" in card
    assert f"| chat template sha256 | `{f16['forge.chat_template.sha256']}` |" in card
    assert '"lr": 0.0002' in card.split("## Provenance")[1]

    # a dataset edit: plan names the file, and every stage after it runs because data does
    old_sha = sha256_file(data)
    data.write_text(rows(12, answer="The answer is {s}."))
    plans = {p.stage.name: p for p in pipeline(tmp_path).plan("quantize")}
    assert not plans["base"].runs
    assert plans["data"].changes == [Change("input", "data/data.jsonl", old_sha, sha256_file(data))]
    assert plans["data"].reason == "input changed: data/data.jsonl"
    assert plans["train"].changes == [Change("upstream", "data")]
    assert plans["merge"].changes == [Change("upstream", "train")]
    assert {c.kind for c in plans["gguf"].changes} == {"upstream"}
    assert {"data", "merge"} <= {c.name for c in plans["gguf"].changes}
    assert plans["quantize"].changes == [Change("upstream", "gguf")]

    shown = subprocess.run(
        [FORGE, "plan", "--to", "quantize"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "data/data.jsonl changed (sha256" in out
    assert "data will run" in out and "5 of 6 stages would run: data, train, merge, gguf, quantize" in out
    assert read_manifest(run_dir / "data")["external"] == {"data/data.jsonl": old_sha}  # plan changed nothing

    # a config key: named with its old and new value
    lr = {p.stage.name: p for p in pipeline(tmp_path, "train.lr=0.001").plan("train")}
    assert Change("config", "train.lr", 0.0002, 0.001) in lr["train"].changes
    assert str(Change("config", "train.lr", 0.0002, 0.001)) == "config train.lr: 0.0002 -> 0.001"

    pipe.run("quantize")
    edited = fields(run_dir / "quantize" / "model-q8_0.gguf")
    assert edited["forge.dataset.sha256"] == sha256_lines({"data.jsonl": sha256_file(data)}) != data_sha


def test_adapter_mode_puts_provenance_in_the_adapter_gguf_and_the_base_part_in_the_base_gguf(tiny_base, tmp_path):
    (tmp_path / "data.jsonl").write_text(rows(12))
    config = {"base": {"model": str(tiny_base)}, "data": {"path": "data.jsonl"}, "ollama": {"mode": "adapter"}}
    (tmp_path / "forge.yaml").write_text(json.dumps(config))
    stages = [BaseStage(), DataStage(), TrainedLora(), MergeStage(), GgufStage()]
    pipe = Pipeline(load_config(tmp_path / "forge.yaml"), stages, log=lambda _: None)
    pipe.run("gguf")
    out = pipe.run_dir / "gguf"
    merged, adapter, base = (fields(out / f"{kind}-f16.gguf") for kind in ("model", "adapter", "base"))
    provenance = {k: v for k, v in merged.items() if k.startswith(CARD_KEYS)}
    assert len(provenance) >= 18 and json.loads(provenance["forge.train_config"])["method"] == "lora"

    # the adapter is the trained artifact: every provenance key of the merged GGUF, and no other
    assert {k: v for k, v in adapter.items() if k.startswith(CARD_KEYS)} == provenance
    assert (adapter["general.type"], adapter["general.name"], adapter["adapter.type"]) == (
        "adapter", "default-lora", "lora"
    )
    assert card_rows(read_gguf_strings(out / "adapter-f16.gguf", prefixes=CARD_KEYS)) == card_rows(
        read_gguf_strings(out / "model-f16.gguf", prefixes=CARD_KEYS)
    )

    # the base GGUF: the base model's identity and digests, the tools, its own chat template; nothing trained
    about_base = {k: v for k, v in provenance.items() if k.startswith(("forge.base.", "forge.version"))}
    assert {k: v for k, v in base.items() if k.startswith(CARD_KEYS)} == {
        **about_base,
        "forge.chat_template.sha256": hashlib.sha256(base["tokenizer.chat_template"].encode()).hexdigest(),
    }
    assert base["forge.base.sha256"] == sha256_lines({p.name: sha256_file(p) for p in tiny_base.iterdir()})
    assert base["forge.chat_template.sha256"] == merged["forge.chat_template.sha256"]  # trained with this one
    assert base["general.name"] == "default-base" and "general.source.repo_url" not in base  # a local folder
    assert not any(str(tmp_path) in str(v) for k, v in base.items() if k.startswith(CARD_KEYS))

    # a base with a Hub id: named as the base GGUF's source (a GGUF base's Hub id is read from there)
    prov = json.loads((out / "provenance.json").read_text())
    hub = base_gguf_metadata({**prov, "base": {**prov["base"], "hub_id": "someone/tiny"}}, None)
    assert hub["general.source.repo_url"] == "https://huggingface.co/someone/tiny"
    assert "forge.chat_template.sha256" not in hub and not any(k.startswith("general.base_model.") for k in hub)


def test_a_hub_base_is_recorded_with_its_commit_and_file_digests(tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    (snapshot / "model.safetensors").write_bytes(b"weights")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    record = base_record(resolve_base("someone/tiny"))
    files = {name: sha256_file(snapshot / name) for name in ("config.json", "model.safetensors")}
    assert record == {"hub_id": "someone/tiny", "commit": commit, "files": files, "sha256": sha256_lines(files)}
    assert hub_snapshot(snapshot) == ("someone/tiny", commit)
    assert hub_snapshot(snapshot.parent / "main") is None
