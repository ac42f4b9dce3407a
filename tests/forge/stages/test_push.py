"""The push stage run by the pipeline on fake upstream outputs, against the local Hub stand-in."""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from forge.modelfiles import validate
from gguf import GGUFReader, GGUFWriter
from safetensors.numpy import save_file

from forge.config import load_config
from forge.hub import HubError, human_size
from forge.models.resolve import resolve_base
from forge.pipeline import Pipeline, Stage, StageContext
from forge.provenance import base_hub_id
from forge.stages.push import PushStage, _base_license, plan_push

REPO = "alice/smol-chat-GGUF"
REPORT_MD = """# Eval report

## Perplexity

| gguf | perplexity | vs f16 |
|---|---|---|
| q8_0 | 11.02 | +0.1% |
| q4_k_m | 11.61 | +5.4% |

![perplexity](ppl.png)
"""
MODELFILE = '''FROM {path}
TEMPLATE """{{{{- range .Messages }}}}<|im_start|>{{{{ .Role }}}}
{{{{ .Content }}}}<|im_end|>
{{{{ end }}}}<|im_start|>assistant
"""
PARAMETER stop "<|im_end|>"
PARAMETER temperature 0.3
'''


PROVENANCE = {
    "general.base_model.0.repo_url": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
    "forge.base.model": "builtin:smollm2-135m-instruct",
    "forge.dataset.sha256": "d" * 64,
    "forge.dataset.files": '{"chat.jsonl": "' + "e" * 64 + '"}',
    "forge.versions.transformers": "5.23.0",
    "forge.train_config": '{"lr": 0.0002, "method": "lora"}',
}


class FixtureStage(Stage):
    """An upstream stage whose output is written by a test function (the real stages land separately)."""

    def __init__(self, name: str, needs: tuple[str, ...], write: Callable[[Path], None]) -> None:
        self.name, self.needs, self._write = name, needs, write

    def run(self, ctx: StageContext) -> dict:
        self._write(ctx.out)
        return {"line": f"fixture {self.name}"}


def write_gguf(path: Path, values: int, seed: int) -> None:
    """A small real GGUF: llama metadata and one F32 tensor of `values` values."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("smol-chat")
    writer.add_context_length(2048)
    for key, value in PROVENANCE.items():  # as the gguf stage writes them (docs/converters.md)
        writer.add_string(key, value)
    writer.add_tensor("token_embd.weight", np.random.default_rng(seed).random(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_png(path: Path) -> None:
    """A 1x1 PNG, as the eval stage's chart stands in."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0\xff\x00\x00")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def upstream(adapter: bool = True, adapter_mode: bool = False) -> list[Stage]:
    """The eight stages push needs, each writing the layout its real counterpart writes (with adapter_mode: that
    of ollama.mode adapter)."""

    def base(out: Path) -> None:
        (out / "model").mkdir()
        (out / "model" / "config.json").write_text('{"model_type": "llama"}')
        gguf = resolve_base("builtin:smollm2-135m-instruct").path
        info = {
            "ref": "builtin:smollm2-135m-instruct",
            "kind": "gguf",
            "path": str(gguf),
            "revision": None,
            "architecture": "LlamaForCausalLM",
            "model_type": "llama",
            "dtype": "float32",
        }
        (out / "base.json").write_text(json.dumps(info))

    def data(out: Path) -> None:
        stats = {
            "format": "messages",
            "examples": 120,
            "train": {"examples": 108},
            "eval": {"examples": 12},
            "tokens": 45678,
            "masked_fraction": 0.4,
            "train_on": "responses",
            "max_seq_len": 1024,
            "packing": False,
        }
        (out / "stats.json").write_text(json.dumps(stats))

    def train(out: Path) -> None:
        if adapter:
            (out / "adapter").mkdir()
            (out / "adapter" / "adapter_config.json").write_text('{"r": 16, "lora_alpha": 32}')
            save_file(
                {"lora_A": np.ones((4, 8), np.float32)}, str(out / "adapter" / "adapter_model.safetensors")
            )
        stats = {
            "steps": 30,
            "tokens": 40000,
            "final_train_loss": 1.2345,
            "final_eval_loss": 1.4567,
            "tokens_per_second": 812.25,
            "peak_memory_gb": 0.75,
        }
        (out / "train_stats.json").write_text(json.dumps(stats))

    def merge(out: Path) -> None:
        (out / "model").mkdir()
        (out / "model" / "config.json").write_text('{"model_type": "llama"}')
        save_file({"w": np.zeros((8, 8), np.float16)}, str(out / "model" / "model.safetensors"))

    def gguf(out: Path) -> None:
        write_gguf(out / "model-f16.gguf", 4_000, seed=3)
        facts: dict = {"path": "model-f16.gguf", "out_type": "f16"}
        if adapter_mode:
            write_gguf(out / "adapter-f16.gguf", 500, seed=4)
            write_gguf(out / "base-f16.gguf", 4_000, seed=5)
            facts["adapter_mode"] = {"adapter": "adapter-f16.gguf", "base": "base-f16.gguf", "modules": 14}
        (out / "gguf.json").write_text(json.dumps(facts))

    def quantize(out: Path) -> None:
        write_gguf(out / "model-q4_k_m.gguf", 100_000, seed=1)  # ~400 KB: a multipart upload
        write_gguf(out / "model-q8_0.gguf", 2_000, seed=2)
        files = [
            {
                "type": t,
                "file": f"model-{t}.gguf",
                "size": (out / f"model-{t}.gguf").stat().st_size,
                "bits_per_weight": b,
                "seconds": 0.1,
            }
            for t, b in (("q4_k_m", 4.85), ("q8_0", 8.5))
        ]
        (out / "quantize.json").write_text(json.dumps({"files": files}))

    def eval_(out: Path) -> None:
        (out / "report.md").write_text(REPORT_MD)
        write_png(out / "ppl.png")
        (out / "report.json").write_text(json.dumps({"gate": {"passed": True, "failures": []}}))

    def ollama(out: Path) -> None:
        for t in ("q4_k_m", "q8_0"):
            text = MODELFILE.format(path=f"/home/me/runs/default/quantize/model-{t}.gguf")
            (out / f"{t}.Modelfile").write_text(text)
        if adapter_mode:  # as the ollama stage writes it: paths into the run folder, next to its own folder
            text = MODELFILE.format(path="../gguf/base-f16.gguf")
            (out / "adapter.Modelfile").write_text(text.replace("\n", "\nADAPTER ../gguf/adapter-f16.gguf\n", 1))
        (out / "ollama.json").write_text('{"files": ["q4_k_m.Modelfile", "q8_0.Modelfile"]}')

    return [
        FixtureStage("base", (), base),
        FixtureStage("data", ("base",), data),
        FixtureStage("train", ("base", "data"), train),
        FixtureStage("merge", ("base", "train"), merge),
        FixtureStage("gguf", ("merge",), gguf),
        FixtureStage("quantize", ("gguf",), quantize),
        FixtureStage("eval", ("merge", "quantize"), eval_),
        FixtureStage("ollama", ("quantize", "eval"), ollama),
    ]


def pipeline(
    tmp_path: Path, *settings: str, adapter: bool = True, adapter_mode: bool = False, log: list[str] | None = None
) -> Pipeline:
    mode = ["ollama.mode=adapter"] if adapter_mode else []
    loaded = load_config(None, [f"run.dir={tmp_path / 'runs'}", f"push.repo={REPO}", *mode, *settings])
    stages = [*upstream(adapter, adapter_mode), PushStage()]
    return Pipeline(loaded, stages, log=(log if log is not None else []).append)


# what a push of the fixture run uploads (merged mode)
RUN_FILES = {
    ".gitattributes",
    "README.md",
    "smol-chat-Q4_K_M.gguf",
    "smol-chat-Q8_0.gguf",
    "Q4_K_M.Modelfile",
    "Q8_0.Modelfile",
    "template",
    "params",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "eval/ppl.png",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_push_uploads_the_run_in_one_commit_with_a_card(hub, tmp_path):
    logs: list[str] = []
    pipe = pipeline(tmp_path, log=logs)
    pipe.run("push")
    run = pipe.run_dir
    arrived = hub.files(REPO)

    assert set(arrived) == RUN_FILES
    assert hub.commit_count(REPO) == 2  # one commit for everything
    for repo_path, local in [
        ("smol-chat-Q4_K_M.gguf", run / "quantize" / "model-q4_k_m.gguf"),
        ("smol-chat-Q8_0.gguf", run / "quantize" / "model-q8_0.gguf"),
        ("adapter/adapter_model.safetensors", run / "train" / "adapter" / "adapter_model.safetensors"),
        ("eval/ppl.png", run / "eval" / "ppl.png"),
    ]:
        assert sha256(arrived[repo_path]) == sha256(local.read_bytes()), repo_path
    back = tmp_path / "back.gguf"  # the GGUF that arrived is a GGUF
    back.write_bytes(arrived["smol-chat-Q4_K_M.gguf"])
    assert GGUFReader(back).tensors[0].n_elements == 100_000

    modelfile = arrived["Q4_K_M.Modelfile"].decode()
    assert modelfile.startswith("FROM ./smol-chat-Q4_K_M.gguf\n") and "/home/me" not in modelfile
    assert arrived["template"].decode().startswith("{{- range .Messages }}<|im_start|>")
    assert json.loads(arrived["params"]) == {"stop": ["<|im_end|>"], "temperature": 0.3}

    card = arrived["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0"  # general.license of the base GGUF
    assert meta["library_name"] == "gguf" and {"gguf", "ollama", "llama"} <= set(meta["tags"])
    assert meta["quantized_by"] == "alice"
    assert f"ollama run hf.co/{REPO}:Q4_K_M" in card and f"llama-cli -hf {REPO}:Q4_K_M" in card
    assert "| steps | 30 |" in card and "| final eval loss | 1.457 |" in card
    assert (
        "| examples | 120 (108 train / 12 eval) |" in card and "| tokens | 45,678, 60% with labels |" in card
    )
    assert (
        "### Perplexity" in card
        and "| q4_k_m | 11.61 | +5.4% |" in card
        and "![perplexity](eval/ppl.png)" in card
    )
    assert "Forge's quality gate passed." in card
    provenance = card.split("## Provenance")[1].split("## Evaluation")[0]
    assert "| base model | HuggingFaceTB/SmolLM2-135M-Instruct (`builtin:smollm2-135m-instruct`) |" in provenance
    assert f"| dataset | dataset (1 file) |\n| dataset sha256 | `{'d' * 64}` |" in provenance
    assert "| transformers | 5.23.0 |" in provenance and '  "lr": 0.0002,' in provenance
    assert card == (run / "push" / "repo" / "README.md").read_text()

    record = json.loads((run / "push" / "push.json").read_text())
    assert record["repo"] == REPO and record["revision"] == "main" and record["commit"] == hub.head(REPO)
    assert {r["path"]: r["sha256"] for r in record["files"]} == {
        p: sha256(b) for p, b in arrived.items() if p != ".gitattributes"
    }
    assert {r["status"] for r in record["files"]} == {"uploaded"}

    everything = [p for p in run.rglob("*") if p.is_file()]
    assert everything and not [p for p in everything if hub.token.encode() in p.read_bytes()]
    assert not [line for line in logs if hub.token in line]


def test_adapter_mode_uploads_the_adapter_and_base_ggufs_and_a_modelfile_that_builds_from_a_download(
    hub, tmp_path
):
    pipe = pipeline(tmp_path, adapter_mode=True)
    pipe.run("push")
    run = pipe.run_dir
    arrived = hub.files(REPO)

    adapter_files = {"ollama-adapter/adapter.gguf", "ollama-adapter/base.gguf", "ollama-adapter/Modelfile"}
    assert set(arrived) == RUN_FILES | adapter_files
    assert hub.commit_count(REPO) == 2  # still one commit for everything
    for kind in ("adapter", "base"):  # quant-free names: `hf.co/<repo>:F16` cannot pick the base by mistake
        uploaded = arrived[f"ollama-adapter/{kind}.gguf"]
        assert sha256(uploaded) == sha256((run / "gguf" / f"{kind}-f16.gguf").read_bytes()), kind
    sources = {r["path"]: r["source"] for r in json.loads((run / "push" / "push.json").read_text())["files"]}
    assert sources["ollama-adapter/adapter.gguf"] == "gguf/adapter-f16.gguf"
    assert sources["ollama-adapter/Modelfile"] == "push/repo/adapter.Modelfile"

    modelfile = arrived["ollama-adapter/Modelfile"].decode()
    assert [line for line in modelfile.splitlines() if line.startswith(("FROM", "ADAPTER"))] == [
        "FROM ./base.gguf",
        "ADAPTER ./adapter.gguf",
    ]
    assert modelfile.replace("FROM ./base.gguf\nADAPTER ./adapter.gguf", "") == (
        (run / "ollama" / "adapter.Modelfile").read_text().replace(
            "FROM ../gguf/base-f16.gguf\nADAPTER ../gguf/adapter-f16.gguf", ""
        )
    )  # only the paths changed
    assert "ADAPTER" not in arrived["Q4_K_M.Modelfile"].decode()  # the quant Modelfiles stay merged
    download = tmp_path / "download"  # `ollama create -f ollama-adapter/Modelfile` in a download: paths resolve
    for path, data in arrived.items():
        (download / path).parent.mkdir(parents=True, exist_ok=True)
        (download / path).write_bytes(data)
    mf = validate(modelfile, "ollama-adapter/Modelfile")
    folder = download / "ollama-adapter"  # Ollama resolves FROM/ADAPTER against the Modelfile's folder
    assert (folder / mf.model).read_bytes() == (run / "gguf" / "base-f16.gguf").read_bytes()
    assert (folder / mf.adapter).read_bytes() == (run / "gguf" / "adapter-f16.gguf").read_bytes()

    files = arrived["README.md"].decode().split("## Files")[1].split("## Run it")[0]
    size = human_size((run / "gguf" / "base-f16.gguf").stat().st_size)
    assert "| `ollama-adapter/adapter.gguf` | F16 LoRA adapter |" in files
    assert f"| `ollama-adapter/base.gguf` | F16 base model | {size} |" in files
    assert "`ollama create smol-chat-gguf -f ollama-adapter/Modelfile`" in files


def test_adapter_mode_without_modelfiles_uploads_the_ggufs_only(tmp_path):
    pipe = pipeline(tmp_path, "push.dry_run=true", "push.what=[gguf]", adapter_mode=True)
    pipe.run("push")
    paths = {r["path"] for r in json.loads((pipe.run_dir / "push" / "push.json").read_text())["files"]}
    assert {"ollama-adapter/adapter.gguf", "ollama-adapter/base.gguf"} <= paths
    assert not [p for p in paths if p.endswith("Modelfile")]
    (pipe.run_dir / "gguf" / "base-f16.gguf").unlink()
    inputs = {name: pipe.run_dir / name for name in PushStage.needs}
    with pytest.raises(HubError, match=r"gguf/base-f16.gguf: listed as the base GGUF in gguf.json but missing"):
        plan_push(pipe.loaded, inputs, tmp_path / "out", REPO)


def test_an_identical_push_is_a_noop_and_a_changed_card_uploads_only_the_card(hub, tmp_path):
    pipeline(tmp_path).run("push")
    head, commits = hub.head(REPO), hub.commit_count(REPO)

    hub.requests.clear()
    pipe = pipeline(tmp_path)
    pipe.run("push", force={"push"})
    record = json.loads((pipe.run_dir / "push" / "push.json").read_text())
    assert record["commit"] == head and hub.commit_count(REPO) == commits
    assert {r["status"] for r in record["files"]} == {"unchanged"}
    assert hub.count("POST", "/commit/") == 0 and hub.count("PUT", "/lfs/") == 0

    hub.requests.clear()
    pipe = pipeline(tmp_path, "push.license=mit")
    pipe.run("push")
    record = json.loads((pipe.run_dir / "push" / "push.json").read_text())
    assert [r["path"] for r in record["files"] if r["status"] == "uploaded"] == ["README.md"]
    assert "license: mit" in hub.files(REPO)["README.md"].decode()
    assert hub.count("PUT", "/lfs/") == 0 and hub.commit_count(REPO) == commits + 1


def test_a_failed_push_leaves_no_output_and_the_rerun_sends_only_the_rest(hub, tmp_path):
    pipe = pipeline(tmp_path)
    pipe.run("eval")
    q8 = sha256((pipe.run_dir / "quantize" / "model-q8_0.gguf").read_bytes())
    hub.fail("PUT", f"/lfs/{q8}$", 400)
    with pytest.raises(HubError, match="run the push again") as err:
        pipe.run("push")
    assert hub.token not in str(err.value)
    assert not (pipe.run_dir / "push").exists()

    stored = set(hub.objects)  # what the failed attempt got through (its uploads run in parallel)
    assert q8 not in stored

    hub.requests.clear()
    pipe.run("push")
    lfs = {sha256(data) for path, data in hub.files(REPO).items() if path in hub.lfs_paths(REPO)}
    assert hub.count("PUT", f"/lfs/{q8}$") == 1 and hub.count("PUT", "/lfs/") == len(lfs - stored)
    assert sha256(hub.files(REPO)["smol-chat-Q8_0.gguf"]) == q8


def test_dry_run_lists_the_files_without_the_network(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    pipe = pipeline(tmp_path, "push.dry_run=true", "push.what=[gguf,merged]", "push.revision=v2")
    pipe.run("push")
    run = pipe.run_dir
    record = json.loads((run / "push" / "push.json").read_text())
    assert record["dry_run"] and record["commit"] is None and record["revision"] == "v2"
    rows = {r["path"]: r for r in record["files"]}
    assert set(rows) == {
        "README.md",
        "smol-chat-Q4_K_M.gguf",
        "smol-chat-Q8_0.gguf",
        "merged/config.json",
        "merged/model.safetensors",
        "eval/ppl.png",
    }
    for path, source in [
        ("smol-chat-Q8_0.gguf", "quantize/model-q8_0.gguf"),
        ("merged/model.safetensors", "merge/model/model.safetensors"),
        ("README.md", "push/repo/README.md"),
    ]:
        data = (run / source).read_bytes()
        assert rows[path]["source"] == source and rows[path]["status"] == "planned"
        assert rows[path]["size"] == len(data) and rows[path]["sha256"] == sha256(data)
    card = (run / "push" / "repo" / "README.md").read_text()
    assert 'subfolder="merged"' in card and "PeftModel" not in card


def test_full_fine_tune_has_no_adapter_to_push(tmp_path):
    pipe = pipeline(tmp_path, "push.dry_run=true", "train.method=full", adapter=False)
    pipe.run("push")
    record = json.loads((pipe.run_dir / "push" / "push.json").read_text())
    assert record["skipped"] == {"adapter": "train.method is full: there is no adapter"}
    assert not [r for r in record["files"] if r["path"].startswith("adapter/")]


def test_a_lora_run_without_its_adapter_is_an_error_naming_the_folder(tmp_path):
    with pytest.raises(HubError, match=r"train/adapter: missing"):
        pipeline(tmp_path, "push.dry_run=true", adapter=False).run("push")


def test_missing_repo_and_modelfile_without_gguf_are_clear_errors(tmp_path):
    pipe = pipeline(tmp_path, "push.dry_run=true", "push.repo=null")
    with pytest.raises(HubError, match="push.repo is not set"):
        pipe.run("push")
    with pytest.raises(HubError, match="'modelfile' needs 'gguf'"):
        pipeline(tmp_path, "push.dry_run=true", "push.what=[modelfile]").run("push")


def test_a_gguf_listed_but_missing_is_an_error_naming_it(tmp_path):
    pipe = pipeline(tmp_path)
    pipe.run("ollama")
    (pipe.run_dir / "quantize" / "model-q8_0.gguf").unlink()  # a pipeline run would redo quantize first
    inputs = {name: pipe.run_dir / name for name in PushStage.needs}
    with pytest.raises(HubError, match=r"quantize/model-q8_0.gguf: listed in quantize.json but missing"):
        plan_push(pipe.loaded, inputs, tmp_path / "out", REPO)


def test_base_model_and_license_come_from_a_gguf_base(tmp_path):
    path = tmp_path / "base.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_source_url("https://huggingface.co/someone/base-model")
    writer.add_license("mit")
    writer.add_token_list([f"tok{i}" for i in range(5000)])  # a vocabulary to skip past
    writer.add_tensor("w", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    base = {"ref": str(path), "kind": "gguf", "path": str(path)}
    assert base_hub_id(base) == "someone/base-model"
    assert _base_license(base) == "mit"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: llama3.2\ntags: [x]\n---\n# base\n")
    assert _base_license({"ref": str(folder), "kind": "folder", "path": str(folder)}) == "llama3.2"
    assert base_hub_id({"ref": str(folder), "kind": "folder", "path": str(folder)}) is None
    assert base_hub_id({"ref": "org/model", "kind": "hub", "path": str(folder)}) == "org/model"
