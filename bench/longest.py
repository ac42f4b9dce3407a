"""The longest sequence each system trains at batch 1 within a memory cap (24 GiB by default).

    python bench/longest.py --model /tmp/model-llama8b --cap-gib 24 \\
        "forge-auto:16:auto@36864 unsloth:16@32768 hf:16@4096 liger:16@14336"

A run is SYSTEM:BITS[:CHECKPOINTING][@GUESS] as in `bench/gpu.sh` (forge* systems through bench/speed.py, the
others through the peers' recipe, .peers/peers_bench.py). Each try is its own process that caps PyTorch's
memory with `torch.cuda.set_per_process_memory_fraction` before anything is allocated, then trains 1 warm-up
and 1 timed step at batch 1; a try fits when it prints its RESULT row with a peak within the cap (an out-of-
memory error, a crash or the timeout do not). Forge's `auto` plans within the cap (forge.train.memory reads it).
From the guess the search climbs (or falls) by a factor until a try fits and one does not, then halves the gap
to the granularity: a try costs a model load and two steps (~40 s for an 8B model), so guesses from the
throughput runs' peak memory save device time. Prints each try and one RESULT row per run (the longest fitting
try's row with `longest_within_gib`, `first_failed_seq` and `tries`; `gpu.sh` with LONGEST= collects them);
each try's output goes to OUT/log-longest-SYSTEM-BITS.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent


def search(
    fits: Callable[[int], bool], guess: int, granularity: int, max_seq: int, factor: float = 1.5, max_tries: int = 6
) -> tuple[int | None, int | None, int]:
    """(longest fitting length, shortest failing length, tries) over multiples of `granularity` up to max_seq.

    Assumes fitting is monotone in the length. Stops early at max_tries with the bracket it has."""

    def snap(length: float) -> int:
        return max(granularity, min(max_seq, int(length) // granularity * granularity))

    best, failed, tries = None, None, 0
    length = snap(guess)
    while tries < max_tries:
        tries += 1
        if fits(length):
            best = length
            if length == max_seq:
                break
        else:
            failed = length
            if length == granularity:
                break
        if best is not None and failed is not None:
            if failed - best <= granularity:
                break
            length = snap((best + failed) / 2)
            if length in (best, failed):
                break
        elif best is not None:
            length = snap(max(best * factor, best + granularity))
        else:
            length = snap(min(failed / factor, failed - granularity))
    return best, failed, tries


def parse_run(spec: str) -> dict:
    """'unsloth:16@32768' -> system, bits, checkpointing (forge runs: auto unless given), guess."""
    spec, _, guess = spec.partition("@")
    system, bits, *rest = spec.split(":")
    checkpointing = rest[0] if rest else ("auto" if system.startswith("forge") else None)
    return {"system": system, "bits": int(bits), "checkpointing": checkpointing, "guess": int(guess or 8192)}


def try_command(run: dict, model: str, seq: int, cap_gib: float) -> list[str]:
    """The child process of one try: this script's `child` capping the memory, then the system's script."""
    if run["system"].startswith("forge"):
        script = [str(HERE / "speed.py"), "run", "--checkpointing", run["checkpointing"]]
    else:
        script = [str(HERE.parent / ".peers" / "peers_bench.py"), "run"]
    args = ["--model", model, "--system", run["system"], "--bits", str(run["bits"])]
    args += ["--bs", "1", "--seq", str(seq), "--steps", "1", "--warmup", "1"]
    return [sys.executable, str(Path(__file__).resolve()), "child", "--cap-gib", str(cap_gib), "--", *script, *args]


def one_try(run: dict, model: str, seq: int, cap_gib: float, timeout_s: int, log: Path) -> tuple[str, dict | None]:
    """Run one try; ('ok', row) when it trained within the cap, else ('oom' | 'over' | 'timeout' | 'error', None)."""
    try:
        done = subprocess.run(
            try_command(run, model, seq, cap_gib), capture_output=True, text=True, timeout=timeout_s, check=False
        )
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        output, done = f"{err.stdout or ''}{err.stderr or ''}", None
    with log.open("a") as f:
        f.write(f"==== seq {seq}\n{output}\n")
    if done is None:
        return "timeout", None
    rows = [json.loads(line[len("RESULT ") :]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode == 0 and rows:
        return ("ok", rows[-1]) if rows[-1]["peak_gib"] <= cap_gib else ("over", None)
    return ("oom" if "out of memory" in output.lower() else "error"), None


def longest(run: dict, args: argparse.Namespace) -> dict | None:
    """Search one run's longest fitting length; its RESULT row (None when no length fits)."""
    rows: dict[int, dict] = {}
    log = args.out / f"log-longest-{run['system']}-{run['bits']}.txt"

    def fits(seq: int) -> bool:
        status, row = one_try(run, args.model, seq, args.cap_gib, args.timeout_s, log)
        shown = f"ok {row['peak_gib']} GiB {row['tokens_per_s']:,.0f} tok/s" if row else status
        print(f"try {run['system']} {run['bits']} seq {seq}: {shown}", flush=True)
        if row:
            rows[seq] = row
        return row is not None

    best, failed, tries = search(fits, run["guess"], args.granularity, args.max_seq, args.factor, args.max_tries)
    if best is None:
        print(f"{run['system']} {run['bits']}: no length from {args.granularity} fits in {args.cap_gib} GiB")
        return None
    return {**rows[best], "longest_within_gib": args.cap_gib, "first_failed_seq": failed, "tries": tries}


def child(cap_gib: float, command: list[str]) -> None:
    """Cap this process's CUDA memory, then run `command` (a Python script and its arguments) in it."""
    import torch

    if not torch.cuda.is_available():
        sys.exit("longest.py child: the memory cap needs a CUDA device (none here)")
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), 0)
    sys.argv = command
    sys.path.insert(0, str(Path(command[0]).resolve().parent))
    runpy.run_path(command[0], run_name="__main__")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        ap = argparse.ArgumentParser(prog="longest.py child")
        ap.add_argument("--cap-gib", type=float, required=True)
        ap.add_argument("command", nargs=argparse.REMAINDER)
        a = ap.parse_args(sys.argv[2:])
        child(a.cap_gib, a.command[1:] if a.command[:1] == ["--"] else a.command)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", help="space-separated SYSTEM:BITS[:CHECKPOINTING][@GUESS]")
    ap.add_argument("--model", required=True)
    ap.add_argument("--cap-gib", type=float, default=24.0)
    ap.add_argument("--granularity", type=int, default=1024)
    ap.add_argument("--max-seq", type=int, default=131072)
    ap.add_argument("--factor", type=float, default=1.5)
    ap.add_argument("--max-tries", type=int, default=6)
    ap.add_argument("--timeout-s", type=int, default=240)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in args.runs.split():
        row = longest(parse_run(spec), args)
        if row is not None:
            print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
