"""The server load benchmark, run small: concurrent uploads folded exactly once, and equal."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "server_load.py"


@pytest.mark.slow
def test_load_benchmark_small_run_is_exactly_once_and_equal(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(BENCHMARK), "--uploads", "30", "--clients", "4",
         "--duplicate-every", "6", "--width", "64", "--queue-size", "4",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "uploads: 30 from 4 clients, 30 accepted" in out
    assert re.search(r"outcomes: 25 folded, 5 duplicate, 0 rejected", out), out
    assert "max abs diff vs sequential fold: 0\n" in out
    assert re.search(r"throughput: [\d.]+ uploads/s .* [\d.]+ folds/s", out)
    assert re.search(r"server peak RSS: [\d.]+ MiB", out)
    assert "exactly once and equal: yes" in out
    # the server really kept a journal line per arrival and emptied its spool
    journal = (tmp_path / "state" / "journal.jsonl").read_text().splitlines()
    assert sum('"event":"accepted"' in line for line in journal) == 30
    assert not list((tmp_path / "state" / "spool").iterdir())
