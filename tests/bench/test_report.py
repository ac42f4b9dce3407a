"""bench/report.py: the results file and the README tables made from RESULT rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def report(tmp_path: Path, rows: list[dict]) -> str:
    """Run report.py on `rows` as a results.jsonl; what it prints (the tables). Files go to tmp_path/out."""
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return subprocess.run(
        [sys.executable, BENCH / "report.py", tmp_path / "results.jsonl", "--out", tmp_path / "out"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def test_report_writes_the_results_file_and_a_table_against_unsloth(tmp_path):
    rows = [
        {"system": "unsloth", "bits": 16, "bs": 2, "seq": 2048, "tokens_per_s": 10000.0, "peak_gib": 16.0},
        {
            "system": "forge",
            "bits": 16,
            "bs": 2,
            "seq": 2048,
            "tokens_per_s": 12500.0,
            "peak_gib": 15.0,
            "reserved_gib": 21.96,
        },
    ]
    common = {"last_loss": 11.9, "gpu": "NVIDIA H100 80GB HBM3", "shape": "llama8b"}
    out = report(tmp_path, [{**row, **common} for row in rows])
    assert "| llama8b | 16 | 2 x 2048 | forge | 12,500 | 15.0 | 22.0 | 1.25x | 0.94x | 11.9000 |" in out
    assert "| llama8b | 16 | 2 x 2048 | unsloth | 10,000 | 16.0 |  | 1.00x | 1.00x | 11.9000 |" in out
    written = list((tmp_path / "out").glob("*-nvidia-h100-80gb-hbm3.json"))
    assert len(written) == 1 and [r["system"] for r in json.loads(written[0].read_text())] == ["unsloth", "forge"]


def test_report_puts_longest_rows_in_their_own_table(tmp_path):
    common = {"bs": 1, "last_loss": 12.5, "gpu": "NVIDIA H100 80GB HBM3", "shape": "llama8b", "bits": 16}
    rows = [
        {**common, "system": "unsloth", "seq": 2048, "bs": 2, "tokens_per_s": 10000.0, "peak_gib": 16.7},
        {
            **common,
            "system": "unsloth",
            "seq": 34816,
            "tokens_per_s": 8000.0,
            "peak_gib": 23.6,
            "longest_within_gib": 24.0,
            "first_failed_seq": 35840,
            "tries": 5,
        },
        {
            **common,
            "system": "forge-auto",
            "checkpointing": "offload",
            "seq": 40960,
            "tokens_per_s": 9000.0,
            "peak_gib": 23.1,
            "longest_within_gib": 24.0,
            "first_failed_seq": None,
            "tries": 3,
        },
    ]
    out = report(tmp_path, rows)
    throughput, _, longest_part = out.partition("Longest sequence at batch 1 within 24 GiB")
    assert "| llama8b | 16 | 2 x 2048 | unsloth | 10,000 |" in throughput and "34,816" not in throughput
    assert "| llama8b | 16 | forge-auto (offload) | 40,960 | 9,000 | 23.1 | none tried | 3 |" in longest_part
    assert "| llama8b | 16 | unsloth | 34,816 | 8,000 | 23.6 | 35,840 | 5 |" in longest_part
