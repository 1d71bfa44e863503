"""The DIMAT sweep on real data at tiny sizes: seeds aggregated, runs saved and resumed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from contmerge.simulations import decentralized as dz
from contmerge.simulations import decentralized_sweep as sweep


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("sweep")
    base = dz.quick_config(agents=3, rounds=2, n_train=300, n_test=150, width=8, progress=False)
    summary = sweep.run_sweep(base, ("fc", "ring"), ("iid",), (0, 1), out)
    return out, base, summary


def test_every_combination_is_run_and_aggregated_over_seeds(swept):
    out, base, summary = swept
    assert set(summary["groups"]) == {"iid/fc", "iid/ring"}
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert set(runs) == {f"iid-{t}-seed{s}" for t in ("fc", "ring") for s in (0, 1)}
    ring = summary["groups"]["iid/ring"]
    for method in ("dimat", "wa"):
        curves = np.array([runs[f"iid-ring-seed{s}"]["runs"][method]["merged"] for s in (0, 1)])
        got = ring["methods"][method]["merged"]
        np.testing.assert_allclose(got["mean"], curves.mean(0))
        np.testing.assert_allclose(got["std"], curves.std(0, ddof=1))
    # the seeds' pretrained agents differ, so the spread is real
    assert runs["iid-ring-seed0"]["initial_accuracy"] != runs["iid-ring-seed1"]["initial_accuracy"]
    # both topologies of one seed start from the same pretrained agents
    assert runs["iid-fc-seed0"]["initial_per_agent"] == runs["iid-ring-seed0"]["initial_per_agent"]
    star = 2 * 2 * runs["iid-fc-seed0"]["model_bytes"]  # FC shortcut, 3 agents
    assert summary["groups"]["iid/fc"]["bytes_per_round"] == star
    v = ring["verdict"]["merged"]
    assert set(v["bytes_to_target"]) == {"dimat", "wa"}
    assert all(1 <= r <= 2 for r in v["dimat_leads_rounds"])
    assert set(summary["alignability"]["iid"]) == {"pair", "all"}
    md = (out / "summary.md").read_text()
    assert "## iid/ring" in md and "Alignability check" in md and " ± " in md


def test_a_rerun_loads_the_saved_runs_instead_of_training(swept):
    out, base, summary = swept
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    again = sweep.run_sweep(base, ("fc", "ring"), ("iid",), (0, 1), out)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["groups"] == summary["groups"]


def test_bytes_to_reach_and_round_ranges():
    assert sweep.bytes_to_reach([0.1, 0.5, 0.7], 0.5, 10) == 20
    assert sweep.bytes_to_reach([0.1, 0.2], 0.5, 10) is None
    assert sweep._ranges([1, 2, 3, 7, 9, 10]) == "1–3, 7, 9–10"
    assert sweep._ranges([]) == "none"
