"""benchmarks/scaling.py end to end on its smallest shape: real merge processes, real files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"


@pytest.mark.slow
def test_scaling_prints_a_row_per_rule_and_writes_the_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "scaling.png"
    run = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--sizes", "5M", "--rules", "average,opcm",
         "--workdir", str(tmp_path / "work"), "--plot", str(plot)],
        capture_output=True, text=True, timeout=1800,  # minutes on a loaded machine
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line.split() for line in run.stdout.splitlines() if re.match(r"\s*5M\s", line)]
    assert [row[4] for row in rows] == ["average", "opcm"], run.stdout
    for row in rows:
        first, second, ratio = float(row[5]), float(row[6]), float(row[-1])
        assert first > 0 and second > 0 and ratio > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the models stay in a given --workdir (a rerun reuses them); the states do not
    assert (tmp_path / "work" / "5M" / "a2" / "config.json").exists()
    assert not list((tmp_path / "work").glob("state-*"))
