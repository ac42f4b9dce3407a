"""The data stage through the pipeline, on a fake base output that holds SmolLM2's real tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from forge.config import load_config
from forge.data.errors import DataError
from forge.data.readers import BUILTIN
from forge.data.shards import load_split
from forge.pipeline import Pipeline, Stage, StageContext, read_manifest, sha256_file
from forge.stages.data import DataStage

ROW = {
    "messages": [
        {"role": "user", "content": "Convert 2 meters to centimeters."},
        {"role": "assistant", "content": "Answer: 200 centimeters"},
    ]
}


class FakeBase(Stage):
    """Stands in for the base stage: a `model/` folder with the tokenizer and chat template, no weights."""

    name = "base"

    def __init__(self, hf_dir: Path) -> None:
        self.hf_dir = hf_dir

    def run(self, ctx: StageContext) -> dict[str, Any]:
        shutil.copytree(self.hf_dir, ctx.out / "model", ignore=shutil.ignore_patterns("*.safetensors"))
        return {"line": "fake base"}


@pytest.fixture
def pipeline_for(tmp_path: Path, smollm2_hf_dir: Path):
    def build(data: dict[str, Any]) -> tuple[Pipeline, list[str]]:
        config = tmp_path / "forge.yaml"
        config.write_text(json.dumps({"run": {"name": "t"}, "data": data}))
        logs: list[str] = []
        return Pipeline(load_config(config), [FakeBase(smollm2_hf_dir), DataStage()], log=logs.append), logs

    return build


def test_second_run_is_a_cache_hit_and_a_dataset_edit_reruns(tmp_path: Path, pipeline_for) -> None:
    (tmp_path / "data.jsonl").write_text(json.dumps(ROW) + "\n")
    pipe, logs = pipeline_for({"path": "data.jsonl", "eval_fraction": 0.0})
    first = pipe.run("data")[-1]
    out = pipe.run_dir / "data"
    assert {f["path"] for f in first["files"]} == {
        "train.safetensors",
        "eval.safetensors",
        "stats.json",
        "meta.json",
        "eval.jsonl",
    }
    assert len(load_split(out / "train.safetensors")) == 1
    assert first["summary"]["line"].startswith("1 example (1 train / 0 eval)")
    assert any("format auto -> messages" in line for line in logs)
    assert first["external"] == {"data/data.jsonl": sha256_file(tmp_path / "data.jsonl")}

    logs.clear()
    second = pipe.run("data")[-1]
    assert second == first
    assert any("data" in line and "cached" in line for line in logs)

    with open(tmp_path / "data.jsonl", "a") as f:
        f.write(json.dumps(ROW | {"id": 2}) + "\n")
    plan = {p.stage.name: p for p in pipe.plan("data")}
    assert plan["base"].state == "cached"
    assert plan["data"].state == "stale" and plan["data"].reason == "input changed: data/data.jsonl"
    third = pipe.run("data")[-1]
    assert third["fingerprint"] != first["fingerprint"] and third["summary"]["examples"] == 2
    assert read_manifest(out)["fingerprint"] == third["fingerprint"]


def test_builtin_sample_digest_is_the_packaged_file(pipeline_for) -> None:
    pipe, _ = pipeline_for({})
    digests = DataStage().external_inputs(pipe.loaded)
    assert digests == {"data/sample.jsonl": sha256_file(BUILTIN["builtin:sample"])}


def test_bad_row_fails_the_stage_with_file_line_and_leaves_no_output(tmp_path: Path, pipeline_for) -> None:
    (tmp_path / "data.jsonl").write_text(json.dumps(ROW) + "\n" + '{"messages": []}\n')
    pipe, _ = pipeline_for({"path": "data.jsonl"})
    with pytest.raises(DataError, match=rf"^{tmp_path / 'data.jsonl'}:2: empty conversation"):
        pipe.run("data")
    assert read_manifest(pipe.run_dir / "data") is None


def test_missing_dataset_is_reported_when_planning(tmp_path: Path, pipeline_for) -> None:
    pipe, _ = pipeline_for({"path": "nowhere.jsonl"})
    with pytest.raises(DataError, match=rf"^{tmp_path / 'nowhere.jsonl'}: dataset not found"):
        pipe.plan("data")
