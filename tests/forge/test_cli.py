"""The forge command as a user runs it, in a subprocess, on the real built-in model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

FORGE = str(Path(sys.executable).parent / "forge")


def forge(*args, cwd, timeout=600):
    return subprocess.run([FORGE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_unknown_key_is_one_line_with_the_closest_key(tmp_path):
    (tmp_path / "forge.yaml").write_text("data:\n  max_seq_lenn: 10\n")
    result = forge("status", cwd=tmp_path)
    assert result.returncode == 1
    assert "unknown key 'data.max_seq_lenn' (did you mean 'max_seq_len'?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_show_prints_effective_config(tmp_path):
    result = forge("config", "--show", "--set", "train.lr=3e-4", "--set", "run.name=exp", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "lr: 0.0003" in result.stdout and "name: exp" in result.stdout


def test_stages_lists_all_nine_in_order(tmp_path):
    result = forge("stages", cwd=tmp_path)
    names = ["base", "data", "train", "merge", "gguf", "quantize", "eval", "ollama", "push"]
    positions = [result.stdout.index(f" {n} ") for n in names]
    assert positions == sorted(positions)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_line(tmp_path):
    """`forge run` in a 64 MiB file system: the base stage's safetensors writer (native code) hits the full
    disk; the user reads one line saying so, and no partial output is left to fill the disk further."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        result = forge("run", "--to", "base", cwd=small)
        assert result.returncode == 1
        assert "stage base: the disk is full (No space left on device" in result.stderr
        assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
        assert not any((small / "runs" / "default" / ".tmp").glob("*"))
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_kill_during_a_stage_leaves_nothing_that_counts(tmp_path):
    """SIGKILL while base writes its folder: no hit afterwards, the dead lock is taken over, the rerun works."""
    proc = subprocess.Popen(
        [FORGE, "run", "--to", "base"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    run_dir = tmp_path / "runs" / "default"
    deadline = time.time() + 300
    while not any((run_dir / ".tmp").glob("base-*/model/*")):
        assert proc.poll() is None, "forge finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "base").exists()
    assert json.loads((run_dir / ".lock").read_text())["pid"] == proc.pid  # the dead owner's lock remains

    status = forge("status", cwd=tmp_path)
    assert status.returncode == 0
    assert "missing" in status.stdout.split("base", 1)[1].splitlines()[0]

    rerun = forge("run", "--to", "base", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert (run_dir / "base" / "manifest.json").is_file()
    assert not any((run_dir / ".tmp").iterdir())
    again = forge("run", "--to", "base", cwd=tmp_path)
    assert "cached" in again.stdout


def _rows(n: int) -> str:
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
        for i in range(n)
    ]
    return "\n".join(json.dumps(r) for r in rows) + "\n"


def test_data_is_cached_and_reruns_only_on_change(tmp_path):
    (tmp_path / "chat.jsonl").write_text(_rows(40))
    (tmp_path / "forge.yaml").write_text("data:\n  path: chat.jsonl\n")
    run_dir = tmp_path / "runs" / "default"

    first = forge("run", "--to", "data", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    made = json.loads((run_dir / "data" / "manifest.json").read_text())
    base_made = json.loads((run_dir / "base" / "manifest.json").read_text())

    second = forge("run", "--to", "data", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "base      cached" in second.stdout and "data      cached" in second.stdout
    assert json.loads((run_dir / "data" / "manifest.json").read_text()) == made  # not rewritten

    rows = (tmp_path / "chat.jsonl").read_text().replace("3 plus 3 is 6.", "3 plus 3 is six.")
    (tmp_path / "chat.jsonl").write_text(rows)
    edited = forge("run", "--to", "data", cwd=tmp_path)
    assert edited.returncode == 0, edited.stderr
    assert "base      cached" in edited.stdout
    assert "data      stale: input changed" in edited.stdout
    after_edit = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert after_edit["fingerprint"] != made["fingerprint"]
    assert json.loads((run_dir / "base" / "manifest.json").read_text()) == base_made

    shorter = forge("run", "--to", "data", "--set", "data.max_seq_len=48", cwd=tmp_path)
    assert shorter.returncode == 0, shorter.stderr
    assert "data      stale: config changed: data.max_seq_len" in shorter.stdout
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    assert json.loads((run_dir / "data" / "manifest.json").read_text())["fingerprint"] != after_edit["fingerprint"]
    assert stats["truncated"] > 0


def test_run_to_ollama_end_to_end(tmp_path):
    """The whole pipeline on the built-in model and data (a short training): Modelfiles that validate, a gate."""
    from forge.modelfiles import validate

    (tmp_path / "forge.yaml").write_text(
        "train:\n  max_steps: 4\n  eval_every: 4\n  save_every: 4\neval:\n  max_eval_tokens: 2048\n"
    )
    result = forge("run", cwd=tmp_path, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "default"
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["gate"]["passed"], report["gate"]
    for quant in ("q4_k_m", "q8_0"):
        modelfile = run_dir / "ollama" / f"{quant}.Modelfile"
        text = modelfile.read_text()
        validate(text)
        gguf = next(line.split(" ", 1)[1] for line in text.splitlines() if line.startswith("FROM "))
        assert (modelfile.parent / gguf).resolve() == (run_dir / "quantize" / f"model-{quant}.gguf").resolve()
        assert 'PARAMETER stop "<|im_end|>"' in text
    command = json.loads((run_dir / "ollama" / "ollama.json").read_text())["command"]
    assert command == f"ollama create default -f {run_dir / 'ollama' / 'q4_k_m.Modelfile'}"

    again = forge("run", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    for stage in ("base", "data", "train", "merge", "gguf", "quantize", "eval", "ollama"):
        assert f"{stage:<9} cached" in again.stdout
