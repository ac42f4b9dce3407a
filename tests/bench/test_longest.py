"""bench/longest.py: the search for the longest fitting sequence, its run specs, the capped child."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
spec = importlib.util.spec_from_file_location("longest", BENCH / "longest.py")
longest = importlib.util.module_from_spec(spec)
spec.loader.exec_module(longest)


def counting(limit: int):
    """A fits() that fits up to `limit` tokens, and the lengths it was asked."""
    asked: list[int] = []

    def fits(seq: int) -> bool:
        asked.append(seq)
        return seq <= limit

    return fits, asked


@pytest.mark.parametrize("limit", [1024, 5000, 33000, 70000, 131072, 200000])
@pytest.mark.parametrize("guess", [1024, 8192, 40960, 131072])
def test_search_finds_the_longest_multiple_that_fits_and_the_next_that_does_not(limit, guess):
    fits, asked = counting(limit)
    best, failed, tries = longest.search(fits, guess, 1024, 131072, max_tries=30)
    expected = min(limit // 1024 * 1024, 131072)
    assert best == expected
    assert failed == (None if expected == 131072 else expected + 1024)
    assert tries == len(asked) == len(set(asked)) and tries <= 20  # no length tried twice


def test_search_stops_at_max_tries_with_a_true_bracket():
    fits, asked = counting(33000)
    best, failed, tries = longest.search(fits, 8192, 1024, 131072, factor=1.5, max_tries=4)
    assert tries == len(asked) == 4
    assert asked == [8192, 12288, 18432, 27648]  # climbing by 1.5, snapped to 1024
    assert (best, failed) == (27648, None)


def test_search_reports_when_nothing_fits():
    fits, asked = counting(512)
    assert longest.search(fits, 8192, 1024, 131072, max_tries=30) == (None, 1024, len(asked))
    assert asked[-1] == 1024


def test_run_specs_name_the_system_bits_checkpointing_and_guess():
    assert longest.parse_run("forge-auto:16:auto@36864") == {
        "system": "forge-auto", "bits": 16, "checkpointing": "auto", "guess": 36864
    }
    assert longest.parse_run("forge:4") == {"system": "forge", "bits": 4, "checkpointing": "auto", "guess": 8192}
    assert longest.parse_run("unsloth:4@65536")["checkpointing"] is None
    command = longest.try_command(longest.parse_run("hf:16"), "/m", 4096, 24.0)
    assert command[2:6] == ["child", "--cap-gib", "24.0", "--"] and command[6].endswith(".peers/peers_bench.py")
    assert command[-10:] == ["--bits", "16", "--bs", "1", "--seq", "4096", "--steps", "1", "--warmup", "1"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_capped_child_refuses_to_run_without_cuda_instead_of_running_uncapped(tmp_path):
    marker = tmp_path / "ran"
    script = tmp_path / "script.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    done = subprocess.run(
        [sys.executable, BENCH / "longest.py", "child", "--cap-gib", "24", "--", script],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "needs a CUDA device" in done.stderr
    assert not marker.exists()
