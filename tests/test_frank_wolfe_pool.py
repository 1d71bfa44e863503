"""The FW pool scenario end to end in quick mode: pools, baselines, FW, reports."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from contmerge.simulations import fw_pool
from contmerge.simulations.data import Task, TaskSpec


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("fw-pool")
    parser = fw_pool.add_fw_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--quick", "--output-dir", str(tmp / "out"), "--cache-dir", str(tmp / "cache"),
         "--irrelevant", "0,4", "--max-iters", "2", "--ada-iters", "10", "--no-progress"]
    )  # fmt: skip
    config = fw_pool.config_from_args(args)
    return fw_pool.run_fw_pool(config)


@pytest.mark.slow
def test_quick_run_merges_every_pool_with_every_method(results: dict) -> None:
    targets, others = results["targets"], results["other_tasks"]
    assert len(targets) == 4 and not set(targets) & set(others)
    runs = results["runs"]
    assert {(r["pool_size"], r["method"]) for r in runs} == {
        (size, m) for size in (4, 8) for m in fw_pool.METHODS
    }
    for run in runs:
        assert set(run["accuracy"]) == set(targets)
        assert all(0.0 <= a <= 1.0 for a in run["accuracy"].values())
        relevant = [p for p in run["pool"] if p.startswith("rel:")]
        irrelevant = [p for p in run["pool"] if p.startswith("irr:")]
        assert sorted(relevant) == sorted(f"rel:{t}" for t in targets)
        assert len(irrelevant) == run["pool_size"] - 4
        assert all(p.split(":")[1].split("#")[0] in others for p in irrelevant)
        if run["method"].startswith("fw"):
            assert len(run["fw_trace"]) == 2
    individual = results["bounds"]["individual"]
    pretrained = results["bounds"]["pretrained"]
    assert sum(individual.values()) > sum(pretrained.values())  # fine-tuning helped


@pytest.mark.slow
def test_reports_are_written(results: dict) -> None:
    files = results["files"]
    saved = json.loads(Path(files["json"]).read_text())
    assert saved["runs"] == results["runs"]
    markdown = Path(files["markdown"]).read_text()
    assert "FW-soft (task)" in markdown and "pool 8 (+4 irrelevant)" in markdown
    assert Path(files["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interleaving_cycles_tasks_before_variants() -> None:
    tasks = [
        Task(name, torch.zeros(1, 784), torch.zeros(1), torch.zeros(1, 784), torch.zeros(1), 10,
             TaskSpec(name, "digits"))
        for name in ("a", "b", "c")
    ]  # fmt: skip
    picked = [(t.name, k) for t, k in fw_pool.interleaved(tasks, 7, 0)]
    assert picked == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("c", 1), ("a", 2)]


def test_batch_ties_matches_a_hand_computed_merge(tmp_path: Path) -> None:
    base = {"w": torch.zeros(5)}
    deltas = [torch.tensor([3.0, -1.0, 0.5, 0.0, 2.0]), torch.tensor([-4.0, -2.0, 0.1, 1.0, 1.0])]
    paths = []
    for k, d in enumerate(deltas):
        path = tmp_path / f"m{k}.safetensors"
        fw_pool.save_safetensors(path, {"w": d})
        paths.append(path)
    # threshold 40 %: k = 5 − ⌊2⌋ = 3, keep |τ| ≥ the 3rd smallest (ties kept), as the authors:
    #   row0 keeps 3, −1, 2 (|τ| ≥ 1); row1 keeps −4, −2, 1, 1 (|τ| ≥ 1)
    # column sums [−1, −3, 0, 1, 3] → signs [−, −, 0, +, +]; agreeing entries summed
    merged = fw_pool.batch_ties(base, paths, scaling=0.5, threshold=40)
    assert torch.equal(merged["w"], 0.5 * torch.tensor([-4.0, -3.0, 0.0, 1.0, 3.0]))
