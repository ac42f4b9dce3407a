"""report.json, report.md (a table per GGUF) and chart.png from a real evaluation; the gate's thresholds."""

from __future__ import annotations

import json
from pathlib import Path

from forge.config import EvalConfig
from forge.eval import EvalReport, check_gate, failure_table, write_report

from .conftest import SMALL


def test_report_files(smollm2_report: EvalReport, tmp_path: Path) -> None:
    written = write_report(smollm2_report, tmp_path)
    assert (
        sorted(p.name for p in tmp_path.iterdir())
        == ["chart.png", "report.json", "report.md"]
        == sorted(p.name for p in written)
    )

    data = json.loads((tmp_path / "report.json").read_text())
    assert data["gate"] == {"passed": True, "failures": []}
    assert [g["name"] for g in data["ggufs"]] == ["f16", "q8_0", "q4_k_m"]
    q8 = data["ggufs"][1]
    assert q8["file"] == "model-q8_0.gguf" and q8["size"] == smollm2_report.gguf("q8_0").path.stat().st_size
    assert q8["perplexity"] == smollm2_report.gguf("q8_0").perplexity.perplexity and q8["kl"] > 0
    assert len(q8["smoke"]["generations"]) == 2 and q8["smoke"]["stopped"] == 2
    assert data["hf"]["base"]["mean_nll"] > data["hf"]["finetuned"]["mean_nll"]

    md = (tmp_path / "report.md").read_text()
    assert "**Gate: passed**" in md and "![perplexity and size per GGUF](chart.png)" in md
    for name in ("model-f16.gguf", "model-q8_0.gguf", "model-q4_k_m.gguf"):
        assert f"## {name}" in md  # one section with its own tables per GGUF
    assert md.count("| prompt | tokens | stopped by | verdict | output |") == 3
    assert "Loss change from fine-tuning" in md

    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "chart.png")
    assert image.shape[0] >= 300 and image.shape[1] >= 800
    assert image[..., :3].std() > 0.05  # bars were drawn, not a blank canvas


def test_a_threshold_missed_is_a_failure_naming_the_limit(smollm2_report: EvalReport) -> None:
    strict = EvalConfig(**SMALL, max_ppl_increase={"q8_0": 0.01, "q4_k_m": 0.001}, max_gguf_hf_gap=0.0)
    gate = check_gate(smollm2_report, strict)
    assert [(f.model, f.check) for f in gate.failures] == [
        ("model-q4_k_m.gguf", "perplexity"),
        ("model-f16.gguf", "conversion"),
    ]
    table = failure_table(gate)
    assert "eval.max_ppl_increase.q4_k_m allows +0.10%" in table
    assert "eval.max_gguf_hf_gap allows ±0.00%" in table
    assert table.splitlines()[0].split() == ["model", "check", "why"]
