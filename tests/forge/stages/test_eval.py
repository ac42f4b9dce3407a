"""The eval stage through the pipeline, on upstream outputs made of real files: SmolLM2 as the base and
merged model, the data stage's held-out split, an f16 GGUF from Forge's converter and its q8_0 quant."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from forge.config import load_config
from forge.eval import EvalError, GateFailed
from forge.pipeline import Pipeline, Stage, StageContext, read_manifest
from forge.stages.eval import EvalStage

from ..eval.eval_inputs import make_ggufs, write_heldout


class Upstream(Stage):
    """Stands in for an upstream stage: hard-links prepared files and folders into its output."""

    def __init__(self, name: str, needs: tuple[str, ...], files: dict[str, Path]) -> None:
        self.name, self.needs, self.files = name, needs, files

    def run(self, ctx: StageContext) -> dict[str, Any]:
        for rel, src in self.files.items():
            if src.is_dir():
                shutil.copytree(src, ctx.out / rel, copy_function=os.link)
            else:
                os.link(src, ctx.out / rel)
        return {"line": f"prepared {self.name}"}


@pytest.fixture(scope="module")
def upstream(smollm2_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """The files each upstream stage writes, by stage name."""
    root = tmp_path_factory.mktemp("upstream")
    data = write_heldout(smollm2_hf_dir, root / "data")
    ggufs = make_ggufs(smollm2_hf_dir, root, ("q8_0",))
    listing = root / "quantize.json"
    listing.write_text(json.dumps({"files": [{"type": "q8_0", "file": "model-q8_0.gguf"}]}))
    return {
        "base": {"model": smollm2_hf_dir},
        "data": {name: data / name for name in ("eval.safetensors", "eval.jsonl", "meta.json")},
        "merge": {"model": smollm2_hf_dir},
        "gguf": {"model-f16.gguf": ggufs["f16"]},
        "quantize": {"model-q8_0.gguf": ggufs["q8_0"], "quantize.json": listing},
    }


@pytest.fixture
def pipeline_for(tmp_path: Path, upstream: dict[str, dict[str, Path]]):
    def build(eval_cfg: dict[str, Any], skip: tuple[str, ...] = ()) -> Pipeline:
        config = tmp_path / "forge.yaml"
        config.write_text(json.dumps({"run": {"name": "t"}, "eval": eval_cfg}))
        needs = {"base": (), "data": ("base",), "merge": ("base",), "gguf": ("merge",), "quantize": ("gguf",)}
        stages: list[Stage] = [
            Upstream(name, needs[name], {k: v for k, v in files.items() if k not in skip})
            for name, files in upstream.items()
        ]
        return Pipeline(load_config(config), [*stages, EvalStage()], log=lambda _: None)

    return build


def test_the_stage_writes_the_report_and_its_summary_carries_the_gate(pipeline_for) -> None:
    # 320 tokens: enough for q8_0 to land within the default +1% of f16 (on 96 it is +1.2%)
    pipe = pipeline_for({"max_eval_tokens": 320, "num_prompts": 1, "max_tokens": 48})
    manifest = pipe.run("eval")[-1]
    out = pipe.run_dir / "eval"
    assert {f["path"] for f in manifest["files"]} == {"report.md", "report.json", "chart.png"}
    report = json.loads((out / "report.json").read_text())
    assert report["gate"] == {"passed": True, "failures": []}
    assert [g["file"] for g in report["ggufs"]] == ["model-f16.gguf", "model-q8_0.gguf"]
    assert report["hf"]["base"] is not None and report["hf"]["finetuned"] is not None

    summary = manifest["summary"]
    assert summary["gate"] == "passed" and summary["failures"] == []
    assert summary["line"].startswith("gate passed, f16 ppl ")
    assert "2/2 generations stopped" in summary["line"]
    assert set(summary["perplexity"]) == {"f16", "q8_0"}
    # what `forge status` shows for a finished stage: the cached plan's summary line
    plan = {p.stage.name: p for p in pipe.plan("eval")}
    assert plan["eval"].state == "cached" and plan["eval"].manifest["summary"]["line"] == summary["line"]


def test_a_failed_gate_fails_the_stage_with_a_table_and_keeps_the_report(pipeline_for) -> None:
    pipe = pipeline_for({"max_eval_tokens": 48, "num_prompts": 1, "max_tokens": 2})
    with pytest.raises(GateFailed) as failed:
        pipe.run("eval")
    message = str(failed.value)
    assert message.startswith("eval gate failed (2 checks; report: ")
    lines = message.splitlines()
    assert lines[1].split() == ["model", "check", "why"]
    assert any("model-f16.gguf" in line and "did not stop within 2 tokens" in line for line in lines)
    assert any("model-q8_0.gguf" in line and "did not stop within 2 tokens" in line for line in lines)
    assert read_manifest(pipe.run_dir / "eval") is None
    kept = Path(message.split("report: ")[1].split(";")[0])
    assert kept.is_file() and "**Gate: FAILED**" in kept.read_text()


def test_with_the_gate_off_a_failure_is_reported_not_raised(pipeline_for) -> None:
    pipe = pipeline_for({"max_eval_tokens": 48, "num_prompts": 1, "max_tokens": 2, "gate": False})
    summary = pipe.run("eval")[-1]["summary"]
    assert summary["gate"] == "failed" and len(summary["failures"]) == 2
    assert summary["line"].startswith("gate FAILED (not enforced), ")
    report = json.loads((pipe.run_dir / "eval" / "report.json").read_text())
    assert report["gate"]["passed"] is False


def test_a_missing_quantize_listing_is_named(pipeline_for) -> None:
    pipe = pipeline_for({}, skip=("quantize.json",))
    with pytest.raises(EvalError, match=r"quantize\.json: cannot read the list of quantized files"):
        pipe.run("eval")
