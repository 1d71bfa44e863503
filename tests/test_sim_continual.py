"""Continual scenario: ACC/BWT arithmetic, and an end-to-end run through the real engine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from contmerge.simulations import continual, data, evaluate, train
from contmerge.simulations.continual import ContinualConfig, StrategySpec, parse_strategy_arg

TASKS = (
    ("fashion_rot90", "digits", "digits_invert")
    if data.fashion_available()
    else ("digits_rot90", "digits_invert", "digits_patch")
)


def test_acc_bwt_on_a_hand_worked_table() -> None:
    # rows: after arrival 1, 2, 3; columns: tasks in arrival order (seen so far)
    table = [
        [0.90],
        [0.80, 0.70],
        [0.60, 0.50, 0.40],
    ]
    acc, bwt = evaluate.acc_bwt(table)
    assert acc == pytest.approx((0.60 + 0.50 + 0.40) / 3)  # 0.5
    assert bwt == pytest.approx(((0.60 - 0.90) + (0.50 - 0.70)) / 2)  # -0.25
    assert evaluate.seen_mean(table) == pytest.approx([0.90, 0.75, 0.50])
    # a model that never forgets and improves earlier tasks has positive BWT
    assert evaluate.acc_bwt([[0.5], [0.7, 0.9]]) == pytest.approx((0.8, 0.2))
    assert evaluate.acc_bwt([[0.42]]) == (pytest.approx(0.42), 0.0)
    with pytest.raises(ValueError):
        evaluate.acc_bwt([[0.9], [0.8]])  # second row must have two entries
    with pytest.raises(ValueError):
        evaluate.acc_bwt([])
    fixed = evaluate.table_from_fixed({"a": 0.1, "b": 0.3}, ["b", "a"])
    assert fixed == [[0.3], [0.3, 0.1]]
    assert evaluate.acc_bwt(fixed) == (pytest.approx(0.2), pytest.approx(0.0))


def test_strategy_arguments_parse() -> None:
    assert parse_strategy_arg("opcm") == StrategySpec("OPCM", "opcm")
    assert parse_strategy_arg("magmax@sequential") == StrategySpec(
        "MagMax-Seq", "magmax", "sequential"
    )
    spec = parse_strategy_arg("ties(lam=0.1, k=0.2)=my ties")
    assert (spec.strategy, spec.label, spec.checkpoints) == (
        "ties(lam=0.1, k=0.2)", "my ties", "independent"
    )  # fmt: skip
    assert parse_strategy_arg("ties(lam=0.1)").label == "ties(lam=0.1)"
    with pytest.raises(ValueError):
        parse_strategy_arg("opcm@shuffled")
    orders = continual.make_orders(["a", "b", "c", "d"], 5, 42)
    assert orders == continual.make_orders(["a", "b", "c", "d"], 5, 42)
    assert all(sorted(o) == ["a", "b", "c", "d"] for o in orders)
    assert len({tuple(o) for o in orders}) > 1


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("continual-out")
    cache = tmp_path_factory.mktemp("continual-cache")
    config = ContinualConfig(
        output_dir=str(out),
        cache_dir=str(cache),
        strategies=(StrategySpec("Average", "average"), StrategySpec("OPCM", "opcm")),
        num_orders=5,
        tasks=TASKS,
        quick=True,
        epochs=3,
        pretrain_epochs=2,
        n_train=600,
        n_test=300,
        progress=False,
    )
    return continual.run_continual(config)


def test_scenario_writes_json_markdown_and_png(run: dict) -> None:
    files = {k: Path(v) for k, v in run["files"].items()}
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files["plot"].stat().st_size > 10_000
    saved = json.loads(files["json"].read_text())
    assert saved["tasks"] == list(TASKS) and len(saved["orders"]) == 5
    methods = [row["method"] for row in saved["summary"]]
    assert methods == ["Pretrained", "Fine-tuned (individual, upper bound)", "Average", "OPCM"]
    md = files["markdown"].read_text()
    for method in methods:
        assert f"| {method} |" in md
    assert "ACC" in md and "BWT" in md and "±" in md


def test_scenario_metrics_are_consistent(run: dict) -> None:
    rows = {row["method"]: row for row in run["summary"]}
    for label in ("Average", "OPCM"):
        per = run["runs"][label]["per_order"]
        assert len(per) == 5
        for p in per:
            table = p["acc_table"]
            assert [len(r) for r in table] == [1, 2, 3]
            assert all(0.0 <= a <= 1.0 for r in table for a in r)
            assert (p["acc"], p["bwt"]) == pytest.approx(evaluate.acc_bwt(table))
            # one model merged = that model: both strategies emit the first arrival itself
            assert table[0][0] == pytest.approx(run["bounds"]["individual"][p["order"][0]])
        accs = [p["acc"] for p in per]
        assert rows[label]["acc_mean"] == pytest.approx(np.mean(accs))
        assert rows[label]["acc_std"] == pytest.approx(np.std(accs))
    # the plain average of the same three models does not depend on the order
    assert rows["Average"]["acc_std"] < 0.005
    pre, ind = rows["Pretrained"]["acc_mean"], rows["Fine-tuned (individual, upper bound)"]
    assert ind["acc_mean"] > pre + 0.05


def test_reported_average_matches_a_direct_average_of_the_checkpoints(run: dict) -> None:
    """Cross-check engine + evaluator: recompute the final average by hand, no merger involved."""
    cache_root = Path(run["cache_dir"])
    ind = {
        n: train.load_safetensors(cache_root / "independent" / f"{n}.safetensors") for n in TASKS
    }
    mean_state = {k: sum(s[k] for s in ind.values()) / len(ind) for k in next(iter(ind.values()))}
    heads = {n: train.load_safetensors(cache_root / "heads" / f"{n}.safetensors") for n in TASKS}
    suite = data.load_suite(ContinualConfig(tasks=TASKS, quick=True, n_train=600, n_test=300)
                            .data_config())  # fmt: skip
    acc = evaluate.Evaluator(suite.tasks, heads).accuracy(mean_state, list(TASKS))
    reported = {row["method"]: row for row in run["summary"]}["Average"]["final_per_task"]
    for name in TASKS:
        assert reported[name] == pytest.approx(acc[name], abs=0.004)
    assert torch.get_num_threads() >= 1


def test_cli_runs_from_cache_and_prints_the_table(
    run: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = continual.add_continual_arguments(argparse.ArgumentParser())
    args = parser.parse_args([
        "--output-dir", str(tmp_path / "cli"), "--cache-dir", str(Path(run["cache_dir"]).parent),
        "--tasks", ",".join(TASKS), "--quick", "--epochs", "3", "--pretrain-epochs", "2",
        "--n-train", "600", "--n-test", "300", "--orders", "2", "--no-progress",
        "--strategy", "magmax@sequential", "--strategy", "latest@sequential",
    ])  # fmt: skip
    before = dict(train.TRAINING_RUNS)
    assert continual.main_continual(args) == 0
    out = capsys.readouterr().out
    assert "| MagMax-Seq | sequential |" in out and "C. fine-tuned (no merge)" in out
    assert (tmp_path / "cli" / "accuracy_vs_merged.png").exists()
    # θ0, heads and independent models came from the cache; only sequential models were new
    new = {k: v - before.get(k, 0) for k, v in train.TRAINING_RUNS.items()}
    assert new.get("pretrain", 0) == 0 and new.get("probe", 0) == 0
    assert new.get("finetune", 0) <= 2 * (len(TASKS) - 1)
