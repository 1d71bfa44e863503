"""The FW pool scenario end to end in quick mode: pools, baselines, FW, reports."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from contmerge.simulations import fw_pool
from contmerge.simulations.data import Task, TaskSpec


def quick_run(tmp: Path, seeds: str, methods: str = ",".join(fw_pool.METHODS)) -> dict:
    parser = fw_pool.add_fw_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--quick", "--output-dir", str(tmp / "out"), "--cache-dir", str(tmp / "cache"),
         "--irrelevant", "0,4", "--relevant", "4", "--seeds", seeds, "--max-iters", "2",
         "--ada-iters", "5", "--adamerging-iters", "5", "--methods", methods, "--no-progress"]
    )  # fmt: skip
    return fw_pool.run_fw_pool(fw_pool.config_from_args(args))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return quick_run(tmp_path_factory.mktemp("fw-pool"), "0")


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return quick_run(tmp_path_factory.mktemp("fw-pool-seeds"), "0,1")


@pytest.mark.slow
def test_quick_run_merges_every_pool_with_every_method(results: dict) -> None:
    targets, others = results["targets"], results["other_tasks"]
    assert len(targets) == 4 and not set(targets) & set(others)
    assert [s["seed"] for s in results["seeds"]] == [0]
    for seed in results["seeds"]:
        runs = seed["runs"]
        assert {(r["series"], r["pool_size"], r["method"]) for r in runs} == {
            (kind, size, m)
            for kind, sizes in (("irrelevant", (4, 8)), ("relevant", (8,)))
            for size in sizes
            for m in fw_pool.METHODS
        }
        for run in runs:
            assert set(run["accuracy"]) == set(targets)
            assert all(0.0 <= a <= 1.0 for a in run["accuracy"].values())
            relevant = [p for p in run["pool"] if p.startswith("rel:")]
            irrelevant = [p for p in run["pool"] if p.startswith("irr:")]
            if run["series"] == "irrelevant":
                assert sorted(relevant) == sorted(f"rel:{t}" for t in targets)
                assert len(irrelevant) == run["pool_size"] - 4
                assert all(p.split(":")[1].split("#")[0] in others for p in irrelevant)
            else:  # 4 relevant + 4 variants of the targets
                assert not irrelevant and len(relevant) == run["pool_size"]
                assert sum("#v1" in p for p in relevant) == 4
            if run["method"].startswith("fw"):
                assert len(run["fw_trace"]) == 2
            if run["method"] in ("adamerging", "fw_hard_headline"):
                assert run["start"]["kind"] == "adamerging"
        by = {(r["series"], r["pool_size"], r["method"]): r for r in runs}
        # the headline FW-hard run starts where AdaMerging ends, and moves at most ~0.65 %
        for key in (("irrelevant", 4), ("irrelevant", 8), ("relevant", 8)):
            ada, fw = by[(*key, "adamerging")], by[(*key, "fw_hard_headline")]
            assert ada["start"] == fw["start"]
        individual = seed["bounds"]["individual"]
        pretrained = seed["bounds"]["pretrained"]
        assert sum(individual.values()) > sum(pretrained.values())  # fine-tuning helped


@pytest.mark.slow
def test_seeds_are_independent_replicates_and_the_table_is_their_mean_and_std(
    two_seeds: dict,
) -> None:
    first, second = two_seeds["seeds"]
    # different seeds: different data, base and fine-tunes
    assert first["bounds"] != second["bounds"] and first["cache_dir"] != second["cache_dir"]
    key = ("irrelevant", 8, "task_arithmetic")
    cell = next(r for r in two_seeds["table"] if (r["series"], r["pool_size"], r["method"]) == key)
    values = [
        run["mean"]
        for seed in (first, second)
        for run in seed["runs"]
        if (run["series"], run["pool_size"], run["method"]) == key
    ]
    assert cell["n"] == 2
    assert cell["mean_std"] == pytest.approx([sum(values) / 2, abs(values[0] - values[1]) / 2**0.5])
    assert "over 2 seed(s)" in Path(two_seeds["files"]["markdown"]).read_text()


def test_cosine_heads_are_fixed_unit_rows_and_train_the_fine_tunes(results: dict) -> None:
    from safetensors.torch import load_file

    seed = results["seeds"][0]
    cache = Path(seed["cache_dir"])
    variants = sorted((cache / fw_pool.VARIANTS_DIR).glob("*.safetensors"))
    # --relevant 4: a second fine-tune (variant 1) of each target, beside the cache's own
    assert {p.stem for p in variants} == {f"{t}-v1" for t in results["targets"]}
    base = load_file(str(cache / "pretrained.safetensors"))
    for path in (variants[0], cache / "independent" / f"{results['targets'][0]}.safetensors"):
        tuned = load_file(str(path))
        assert any(not torch.equal(base[k], tuned[k]) for k in base)
    for name in results["targets"]:
        state = load_file(str(cache / "heads" / f"{name}.safetensors"))
        assert set(state) == {"weight"}  # no bias: the fixed cosine head, not a linear probe
        torch.testing.assert_close(state["weight"].norm(dim=1), torch.ones(len(state["weight"])))
        head = fw_pool.head_from_state(state)
        assert not list(head.parameters())  # a buffer: never trained, never merged


def test_a_rerun_loads_each_finished_seed(results: dict) -> None:
    out = Path(results["files"]["json"]).parent
    saved = out / "seeds" / "seed-0.json"
    stamp = saved.stat().st_mtime_ns
    again = quick_run(out.parent, "0")
    assert saved.stat().st_mtime_ns == stamp  # loaded, not recomputed
    assert again["table"] == results["table"]
    fewer = quick_run(out.parent, "0", "task_arithmetic,fw_soft_headline")
    assert saved.stat().st_mtime_ns == stamp  # a subset of the methods: loaded too
    assert {r["method"] for r in fewer["table"]} == {"task_arithmetic", "fw_soft_headline"}
    assert [r for r in fewer["table"] if r["method"] == "task_arithmetic"] == [
        r for r in results["table"] if r["method"] == "task_arithmetic"
    ]
    quick_run(out.parent, "0")  # the reports of the whole run again, for the next test


@pytest.mark.slow
def test_reports_are_written(results: dict) -> None:
    files = results["files"]
    saved = json.loads(Path(files["json"]).read_text())
    assert saved["table"] == results["table"]
    markdown = Path(files["markdown"]).read_text()
    assert "FW-soft, headline" in markdown and "pool 8 (+4 irrelevant)" in markdown
    assert "## Adding relevant models" in markdown and " ± " in markdown
    assert "test inputs" in markdown
    assert Path(files["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _task(name: str, classes: int) -> Task:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(classes).repeat(10)
    return Task(name, torch.rand(len(y), 784, generator=gen), y, torch.rand(5, 784), y[:5],
                classes, TaskSpec(name, "digits"))  # fmt: skip


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
