"""The stage contract on small stages defined here: hits, staleness, atomic outputs, locks, force, clean."""

import json
import os
import subprocess
import sys

import pytest

from forge.config import load_config
from forge.pipeline import Change, Pipeline, PipelineError, Stage, read_manifest


class Recorder(Stage):
    """Writes a file derived from its config part and its input; counts its runs."""

    def __init__(self, name, needs=(), keys=(), fail=False):
        self.name, self.needs, self.config_keys, self.fail = name, needs, keys, fail
        self.runs = 0
        self.external = {}

    def external_inputs(self, loaded):
        return dict(self.external)

    def run(self, ctx):
        self.runs += 1
        upstream = "".join((ctx.inputs[n] / "out.txt").read_text() for n in self.needs)
        (ctx.out / "out.txt").write_text(upstream + f"{self.name}:{ctx.config.train.lr};")
        if self.fail:
            raise RuntimeError("boom")
        return {"line": f"{self.name} ok"}


@pytest.fixture
def make(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def build(*overrides, stages=None):
        stages = stages or [Recorder("a"), Recorder("b", ("a",), ("train.lr",)), Recorder("c", ("b",))]
        return Pipeline(load_config(None, list(overrides)), stages, log=lambda _: None), stages

    return build


def test_second_run_is_a_hit(make):
    pipe, (a, b, c) = make()
    pipe.run("c")
    pipe.run("c")
    assert (a.runs, b.runs, c.runs) == (1, 1, 1)
    assert [p.state for p in pipe.plan()] == ["cached"] * 3
    manifest = read_manifest(pipe.run_dir / "c")
    assert manifest["files"][0]["path"] == "out.txt"
    assert manifest["inputs"]["b"] == read_manifest(pipe.run_dir / "b")["fingerprint"]


def test_config_change_reruns_stage_and_downstream_only(make):
    pipe, stages = make()
    pipe.run("c")
    pipe2, (a, b, c) = make("train.lr=0.5", stages=stages)
    plan = {p.stage.name: p for p in pipe2.plan()}
    assert plan["a"].state == "cached"
    assert plan["b"].state == "stale" and "train.lr" in plan["b"].reason
    assert plan["c"].state == "stale"
    pipe2.run("c")
    assert (a.runs, b.runs, c.runs) == (1, 2, 2)
    assert (pipe2.run_dir / "c" / "out.txt").read_text() == "a:0.0002;b:0.5;c:0.5;"


def test_external_input_change_is_named(make):
    pipe, (a, b, c) = make()
    pipe.run("c")
    a.external = {"dataset": "abc"}
    plan = {p.stage.name: p for p in pipe.plan()}
    assert plan["a"].state == "stale" and plan["a"].reason == "input changed: dataset"
    assert plan["b"].reason == "a will re-run"


def test_plan_names_each_change_and_is_what_run_does(make):
    pipe, (a, b, c) = make()
    pipe.run("c")
    a.external = {"data/x.jsonl": "1" * 64}
    pipe2, _ = make("train.lr=0.5", stages=[a, b, c])
    plan = {p.stage.name: p for p in pipe2.plan("c")}
    assert plan["a"].changes == [Change("input", "data/x.jsonl", None, "1" * 64)]
    assert plan["b"].changes == [Change("config", "train.lr", 0.0002, 0.5), Change("upstream", "a")]
    assert plan["b"].reason == "config changed: train.lr; a will re-run"
    assert [str(ch) for ch in plan["b"].changes] == ["config train.lr: 0.0002 -> 0.5", "a will run"]
    assert str(plan["a"].changes[0]) == "data/x.jsonl added"
    pipe2.run("c")
    a.external = {"data/x.jsonl": "2" * 64}
    assert str(pipe2.plan("a")[0].changes[0]) == f"data/x.jsonl changed (sha256 {'1' * 12} -> {'2' * 12})"
    a.external = {"data/x.jsonl": "1" * 64}

    # nothing changed: only --force makes stages run, the forced one and what follows
    assert not any(p.runs for p in pipe2.plan("c"))
    forced = {p.stage.name: p for p in pipe2.plan("c", force={"b"})}
    assert [forced[n].runs for n in "abc"] == [False, True, True]
    assert forced["b"].changes == [Change("forced", "b")] and forced["b"].state == "cached"
    assert forced["c"].changes == [Change("upstream", "b")]
    runs = (a.runs, b.runs, c.runs)
    pipe2.run("c", force={"b"})
    assert (a.runs, b.runs, c.runs) == (runs[0], runs[1] + 1, runs[2] + 1)


def test_damaged_output_is_not_trusted(make):
    pipe, (a, b, c) = make()
    pipe.run("c")
    out = pipe.run_dir / "b" / "out.txt"
    out.write_text(out.read_text() + "x")
    plan = {p.stage.name: p for p in pipe.plan()}
    assert plan["b"].state == "stale" and plan["b"].reason == "out.txt changed size"
    assert plan["c"].state == "stale" and plan["c"].reason == "b will re-run"  # c reads what b rewrites
    pipe.run("c")
    assert (a.runs, b.runs, c.runs) == (1, 2, 2)
    # same size, different bytes: only --verify sees it
    text = out.read_text()
    out.write_text(text[:-1] + ("X" if text[-1] != "X" else "Y"))
    assert {p.stage.name: p.state for p in pipe.plan()}["b"] == "cached"
    assert {p.stage.name: p.state for p in pipe.plan(verify=True)}["b"] == "stale"


def test_force_reruns_stage_and_downstream(make):
    pipe, (a, b, c) = make()
    pipe.run("c")
    pipe.run("c", force={"b"})
    assert (a.runs, b.runs, c.runs) == (1, 2, 2)


def test_failed_stage_keeps_earlier_results_and_leaves_no_output(make):
    stages = [Recorder("a"), Recorder("b", ("a",), fail=True)]
    pipe, _ = make(stages=stages)
    with pytest.raises(RuntimeError, match="boom"):
        pipe.run("b")
    assert read_manifest(pipe.run_dir / "a") is not None
    assert not (pipe.run_dir / "b").exists()
    assert not any((pipe.run_dir / ".tmp").glob("*"))
    assert not (pipe.run_dir / ".lock").exists()


class DiskFiller(Recorder):
    """Writes its output through a link to /dev/full: the kernel's real ENOSPC, as on a full disk."""

    def run(self, ctx):
        (ctx.out / "weights.bin").symlink_to("/dev/full")
        with open(ctx.out / "weights.bin", "wb") as f:
            f.write(b"\0" * 2**20)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_disk_is_one_line_and_keeps_earlier_results(make):
    pipe, _ = make(stages=[Recorder("a"), DiskFiller("b", ("a",))])
    with pytest.raises(PipelineError) as caught:
        pipe.run("b")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("stage b: the disk is full (No space left on device); its partial output is removed")
    assert f"free at {pipe.run_dir} now" in message and "finished stages are kept" in message and "run.dir" in message
    assert read_manifest(pipe.run_dir / "a") is not None
    assert not (pipe.run_dir / "b").exists() and not any((pipe.run_dir / ".tmp").glob("*"))
    assert not (pipe.run_dir / ".lock").exists()


def test_lock_names_the_live_owner(make):
    pipe, _ = make()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pipe.run_dir.mkdir(parents=True)
        (pipe.run_dir / ".lock").write_text(
            json.dumps({"pid": holder.pid, "host": os.uname().nodename, "since": "now"})
        )
        with pytest.raises(PipelineError, match=rf"in use by pid {holder.pid}"):
            pipe.run("c")
    finally:
        holder.kill()
        holder.wait()
    pipe.run("c")  # the owner is dead: its lock is taken over
    assert read_manifest(pipe.run_dir / "c") is not None


def test_clean_removes_stage_and_downstream(make):
    pipe, _ = make()
    pipe.run("c")
    assert pipe.clean("b") == ["b", "c"]
    assert [p.state for p in pipe.plan()] == ["cached", "missing", "missing"]
