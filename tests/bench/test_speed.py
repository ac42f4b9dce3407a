"""bench/speed.py runs end to end on a CPU (tiny shape): it makes a model, trains it and reports a RESULT row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _row(model: Path, *extra: str) -> dict:
    run = subprocess.run(
        [sys.executable, BENCH / "speed.py", "run", "--model", model, "--device", "cpu", "--checkpointing", "full"]
        + ["--seq", "32", "--steps", "2", "--warmup", "1", *extra],
        check=True,
        capture_output=True,
        text=True,
    )
    rows = [json.loads(line[len("RESULT ") :]) for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(rows) == 1
    return rows[0]


def test_speed_makes_a_model_trains_it_and_reports_a_row(tmp_path):
    model = tmp_path / "tiny"
    subprocess.run([sys.executable, BENCH / "speed.py", "make", "--shape", "tiny", "--out", model], check=True)
    row = _row(model)
    assert (row["system"], row["bits"], row["bs"], row["seq"], row["checkpointing"]) == ("forge", 16, 2, 32, "full")
    assert row["tokens_per_s"] > 0 and row["recomputed_layers"] == 2
    assert 6.0 < row["first_loss"] < 8.0  # about ln(1000) for a random model
    assert row["versions"]["torch"]
    # the A/B switch: casts in every forward train the very same steps as the casts kept across steps
    every = _row(model, "--casts-every-forward")
    assert (every["first_loss"], every["last_loss"]) == (row["first_loss"], row["last_loss"])
    assert row["last_loss"] != row["first_loss"]
