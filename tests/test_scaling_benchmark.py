"""benchmarks/scaling.py end to end on its smallest shape: real merge processes, real files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"


def test_variants_written_side_by_side_are_the_files_written_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARK.parent))
    import torch
    from _common import arrival_tensor, write_model
    from _llama import LlamaShape, write_llamas

    from contmerge.tensorfile import TensorMeta

    shape = LlamaShape(hidden=64, layers=2, intermediate=96, vocab=300, heads=4)
    together = write_llamas({i: tmp_path / f"v{i}" for i in range(3)}, shape, shards=2)
    metas = shape.metas()
    names = list(metas)
    per_shard = -(-len(names) // 2)
    for i, directory in together.items():
        shards = sorted(directory.glob("*.safetensors"))
        assert len(shards) == 2 and (directory / "config.json").exists()
        for s, shard in enumerate(shards):  # one variant at a time, each tensor drawn afresh
            part = {n: metas[n] for n in names[s * per_shard : (s + 1) * per_shard]}
            tensors = (
                arrival_tensor(n, TensorMeta(m.shape, torch.float32), i).to(torch.bfloat16)
                for n, m in part.items()
            )
            alone = write_model(tmp_path / f"alone-{i}-{s}.safetensors", part, tensors)
            assert shard.read_bytes() == alone.read_bytes(), (i, shard.name)
    assert (tmp_path / "v0" / shards[0].name).read_bytes() != shards[0].read_bytes()


@pytest.mark.slow
def test_scaling_prints_a_row_per_rule_and_writes_the_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "scaling.png"
    results = tmp_path / "rows.jsonl"
    run = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--sizes", "5M", "--rules", "average,opcm",
         "--workdir", str(tmp_path / "work"), "--plot", str(plot), "--results", str(results)],
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
    # the saved rows come back unchanged, plotted without measuring anything (--sizes '')
    again = subprocess.run(
        [sys.executable, str(BENCHMARK), "--sizes", "", "--merge", str(results),
         "--plot", str(tmp_path / "again.png")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    table = [line for line in run.stdout.splitlines() if re.match(r"\s*5M\s", line)]
    assert [line for line in again.stdout.splitlines() if re.match(r"\s*5M\s", line)] == table
    assert (tmp_path / "again.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(results.read_text().splitlines()) == 2
