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

from contmerge.flower.cli import add_federated_parser

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


def test_average_strategy_matches_fedavg_in_one_simulation(tmp_path: Path) -> None:
    out = tmp_path / "report"
    cmd = [
        sys.executable,
        "-m",
        "contmerge.flower",
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
        "--out",
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
