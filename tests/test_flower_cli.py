"""``simulate federated`` end to end: a real (small) simulation writing table, JSON and plot."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from contmerge.simulations.federated.cli import add_federated_parser
from contmerge.simulations.federated.report import figure, markdown

# Same data settings as test_flower_app.py, so both reuse one cached θ0 and heads.
SMALL = ["--tasks", "fashion_rot90,digits", "--n-train", "300", "--n-test", "200"]


def test_parser_accepts_the_documented_options_and_refuses_bad_partitions() -> None:
    parser = argparse.ArgumentParser()
    add_federated_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["federated", "--strategy", "opcm(alpha=0.3)", "--clients", "6",
                              "--partition", "dirichlet:0.5", "--merge", "continual"])  # fmt: skip
    assert (args.strategy, args.clients, args.partition, args.merge) == (
        "opcm(alpha=0.3)", 6, "dirichlet:0.5", "continual",
    )  # fmt: skip
    assert callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["federated", "--partition", "dirichlet:-1"])


@pytest.mark.slow
def test_average_strategy_matches_fedavg_in_one_simulation(tmp_path: Path) -> None:
    out = tmp_path / "report"
    cmd = [
        sys.executable,
        "-m",
        "contmerge",
        "simulate",
        "federated",
        "--strategy",
        "average",
        "--clients",
        "2",
        "--rounds",
        "2",
        "--partition",
        "iid",
        *SMALL,
        # 3 local epochs: with one, 5 Adam steps from θ0 lower accuracy before it rises again
        "--local-epochs",
        "3",
        "--output-dir",
        str(out),
    ]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results = json.loads((out / "results.json").read_text())
    ours, fedavg = results["strategies"]["average (round)"], results["strategies"]["fedavg"]
    assert sorted(ours["accuracy"], key=int) == ["0", "1", "2"]
    for r in ("0", "1", "2"):
        assert ours["accuracy"][r]["mean"] == pytest.approx(fedavg["accuracy"][r]["mean"], abs=0.01)
    # training helped: both tasks are new domains for the pretrained backbone
    assert ours["accuracy"]["2"]["mean"] > ours["accuracy"]["0"]["mean"]
    assert [len(r["folded"]) for r in ours["rounds"]] == [2, 2]
    table = (out / "results.md").read_text()
    assert "| round | average (round) | fedavg |" in table
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| round |" in done.stdout  # the table is printed too
    # Flower's "run_simulation is deprecated, use flwr run" is not this command's user's concern
    assert "run_simulation" not in done.stdout + done.stderr
    # start-up, rounds and the server's own work are timed apart, for both strategies alike
    assert 0 < results["startup_seconds"] < results["seconds"]
    for s in (ours, fedavg):
        rounds = {int(r): t for r, t in s["round_seconds"].items()}
        server = {int(r): t for r, t in s["server_seconds"].items()}
        assert sorted(rounds) == sorted(server) == [1, 2]
        assert all(0 <= server[r] <= rounds[r] for r in rounds)
        assert sum(rounds.values()) <= s["seconds"]
    assert "Simulation start-up" in table and "server's work per round" in table


RESULTS = {
    "config": {"clients": 2, "rounds": 3, "scenario": {"partition": "iid", "local_epochs": 1}},
    "tasks": ["a", "b"],
    "sources": "digits-only",
    "startup_seconds": 2.5,
    "strategies": {
        "opcm (round)": {
            "accuracy": {str(r): {"mean": 0.5 + 0.1 * r} for r in range(4)},
            "seconds": 38.0,
            "round_seconds": {"1": 35.4, "2": 1.0, "3": 1.2},
            "server_seconds": {"1": 0.02, "2": 0.04, "3": 0.03},
        },
        "fedavg": {
            "accuracy": {str(r): {"mean": 0.5 + 0.09 * r} for r in range(4)},
            "seconds": 2.4,
            "round_seconds": {"1": 0.9, "2": 0.7, "3": 0.8},
            "server_seconds": {"1": 0.01, "2": 0.01, "3": 0.01},
        },
    },
}


def test_summary_keeps_start_up_and_first_round_apart_from_the_folds() -> None:
    text = markdown(RESULTS)
    assert "Simulation start-up (Ray, before the ServerApp ran): 2.5 s" in text
    assert "| opcm (round) | 35.4 | 1.1 | 0.030 | 38.0 |" in text
    assert "| fedavg | 0.9 | 0.8 | 0.010 | 2.4 |" in text
    assert "round 1 of the strategy that ran first (opcm (round)) also starts Ray's" in text


def test_accuracy_plot_has_whole_round_ticks() -> None:
    import matplotlib.pyplot as plt

    fig = figure(RESULTS)
    try:
        ticks = [t for t in fig.axes[0].get_xticks() if 0 <= t <= 3]
        assert ticks == [0, 1, 2, 3], ticks
    finally:
        plt.close(fig)
