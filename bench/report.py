"""Turn the benchmark's RESULT lines into the results file and the README table.

    python bench/report.py OUT/results.jsonl --out DIR     # writes DIR/<date>-<device>.json and .md
    grep RESULT log | python bench/report.py --tag-shape llama8b   # RESULT lines -> jsonl rows with the shape

A row: system (forge = memory-matched, forge-auto, unsloth, liger, hf), bits, shape, bs, seq, tokens_per_s,
peak_gib (CUDA's peak allocation: the memory compared), reserved_gib when the run recorded it (what the
caching allocator held at most), loss after the timed steps, and what the run recorded of versions and device.
The table gives each row's speed and memory against Unsloth's row of the same shape, bits and sequence length; rows from
`bench/longest.py` (with `longest_within_gib`) make a second table: the longest sequence at batch 1 within the cap.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

ORDER = ["forge", "forge-auto", "unsloth", "liger", "hf"]


def load_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        row["loss"] = row.get("last_loss")
    return rows


def device_slug(rows: list[dict]) -> str:
    gpu = rows[0].get("gpu", "gpu") if rows else "gpu"
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")


def label(row: dict) -> str:
    """The system, with Forge's checkpointing mode: 'forge (offload)'."""
    return row["system"] + (f" ({row['checkpointing']})" if "checkpointing" in row else "")


def table(rows: list[dict]) -> str:
    """Markdown: one line per run, grouped by shape, sequence length and bits, ratios against Unsloth."""
    head = "| shape | bits | bs x seq | system | tokens/s | peak GiB | reserved GiB | vs Unsloth speed "
    head += "| vs Unsloth memory | loss |\n|---|---|---|---|---|---|---|---|---|---|\n"

    def key(row: dict) -> tuple:
        system = row["system"]
        return (row["shape"], row["seq"], -row["bits"], ORDER.index(system) if system in ORDER else 99)

    lines = []
    for row in sorted(rows, key=key):
        same = (row["shape"], row["bits"], row["seq"])
        ref = next((r for r in rows if r["system"] == "unsloth" and (r["shape"], r["bits"], r["seq"]) == same), None)
        speed = f"{row['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else ""
        memory = f"{row['peak_gib'] / ref['peak_gib']:.2f}x" if ref else ""
        reserved = f"{row['reserved_gib']:.1f}" if row.get("reserved_gib") is not None else ""
        lines.append(
            f"| {row['shape']} | {row['bits']} | {row['bs']} x {row['seq']} | {label(row)} "
            f"| {row['tokens_per_s']:,.0f} | {row['peak_gib']:.1f} | {reserved} | {speed} | {memory} "
            f"| {row['loss']:.4f} |"
        )
    return head + "\n".join(lines) + "\n"


def longest_table(rows: list[dict]) -> str:
    """Markdown: the longest sequence at batch 1 within the memory cap, per shape, bits and system."""
    if not rows:
        return ""
    cap = rows[0]["longest_within_gib"]
    head = f"Longest sequence at batch 1 within {cap:g} GiB:\n\n"
    head += "| shape | bits | system | longest seq | tokens/s there | peak GiB | first failed | tries |\n"
    head += "|---|---|---|---|---|---|---|---|\n"
    lines = []
    for row in sorted(rows, key=lambda r: (r["shape"], -r["bits"], -r["seq"])):
        failed = f"{row['first_failed_seq']:,}" if row["first_failed_seq"] else "none tried"
        lines.append(
            f"| {row['shape']} | {row['bits']} | {label(row)} | {row['seq']:,} | {row['tokens_per_s']:,.0f} "
            f"| {row['peak_gib']:.1f} | {failed} | {row['tries']} |"
        )
    return head + "\n".join(lines) + "\n"


def tables(rows: list[dict]) -> str:
    """The throughput table, then (when there are such rows) the longest-sequence table."""
    longest = [r for r in rows if "longest_within_gib" in r]
    throughput = [r for r in rows if "longest_within_gib" not in r]
    return "\n".join(t for t in (table(throughput) if throughput else "", longest_table(longest)) if t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--tag-shape", help="read RESULT lines on stdin, print them as jsonl rows with this shape")
    args = ap.parse_args()
    if args.tag_shape:
        for line in sys.stdin:
            if line.startswith("RESULT "):
                print(json.dumps({**json.loads(line[len("RESULT ") :]), "shape": args.tag_shape}))
        return
    rows = load_rows(args.results)
    stem = f"{datetime.date.today().isoformat()}-{device_slug(rows)}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(tables(rows))
    print(tables(rows))


if __name__ == "__main__":
    main()
