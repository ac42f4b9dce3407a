"""The benchmark scripts run end to end (on a CPU, tiny shape): a RESULT row, and the table made from rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_speed_makes_a_model_trains_it_and_reports_a_row(tmp_path):
    model = tmp_path / "tiny"
    subprocess.run([sys.executable, BENCH / "speed.py", "make", "--shape", "tiny", "--out", model], check=True)
    run = subprocess.run(
        [sys.executable, BENCH / "speed.py", "run", "--model", model, "--device", "cpu", "--checkpointing", "full"]
        + ["--seq", "32", "--steps", "2", "--warmup", "1"],
        check=True,
        capture_output=True,
        text=True,
    )
    rows = [json.loads(line[len("RESULT ") :]) for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(rows) == 1
    row = rows[0]
    assert (row["system"], row["bits"], row["bs"], row["seq"], row["checkpointing"]) == ("forge", 16, 2, 32, "full")
    assert row["tokens_per_s"] > 0 and row["recomputed_layers"] == 2
    assert 6.0 < row["first_loss"] < 8.0  # about ln(1000) for a random model
    assert row["versions"]["torch"]


def test_report_writes_the_results_file_and_a_table_against_unsloth(tmp_path):
    rows = [
        {"system": "unsloth", "bits": 16, "bs": 2, "seq": 2048, "tokens_per_s": 10000.0, "peak_gib": 16.0},
        {"system": "forge", "bits": 16, "bs": 2, "seq": 2048, "tokens_per_s": 12500.0, "peak_gib": 15.0},
    ]
    lines = [json.dumps({**row, "last_loss": 11.9, "gpu": "NVIDIA H100 80GB HBM3", "shape": "llama8b"}) for row in rows]
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        [sys.executable, BENCH / "report.py", tmp_path / "results.jsonl", "--out", tmp_path / "out"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "| llama8b | 16 | 2 x 2048 | forge | 12,500 | 15.0 | 1.25x | 0.94x | 11.9000 |" in out
    written = list((tmp_path / "out").glob("*-nvidia-h100-80gb-hbm3.json"))
    assert len(written) == 1 and [r["system"] for r in json.loads(written[0].read_text())] == ["unsloth", "forge"]
