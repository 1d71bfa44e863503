"""The decentralized DIMAT scenario on real offline data (tiny settings)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from contmerge.simulations import decentralized as dz


def test_non_iid_gives_whole_disjoint_classes_per_agent():
    y = torch.tensor([c for c in range(10) for _ in range(7 + c)])  # unequal class sizes
    shards = dz.partition(y, 5, "non-iid", seed=0)
    for i, s in enumerate(shards):
        assert set(y[s].tolist()) == {i, i + 5}  # class c -> agent c mod N
        assert len(s) == 2 * 7  # every class trimmed to the smallest class count
    assert len(set().union(*(set(s.tolist()) for s in shards))) == sum(map(len, shards))
    with pytest.raises(ValueError, match="at most 10 agents"):
        dz.partition(y, 11, "non-iid", seed=0)


def test_iid_deals_every_class_evenly():
    y = torch.tensor([c for c in range(10) for _ in range(7 + c)])
    shards = dz.partition(y, 4, "iid", seed=0)
    assert sorted(torch.cat(shards).tolist()) == list(range(len(y)))
    for c in range(10):
        counts = [int((y[s] == c).sum()) for s in shards]
        assert max(counts) - min(counts) <= 1
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_quick_run_reports_both_methods(tmp_path, capsys):
    cfg = dz.quick_config(
        agents=3, rounds=2, n_train=300, n_test=150, width=4, output_dir=str(tmp_path)
    )
    results = dz.run_decentralized(cfg)
    assert "OWN training shard" in capsys.readouterr().out
    assert set(results["runs"]) == {"dimat", "wa"}
    for rec in results["runs"].values():
        assert len(rec["merged"]) == len(rec["trained"]) == 2
        assert all(0.0 <= a <= 1.0 for a in rec["merged"] + rec["trained"])
        assert len(rec["merged_per_agent"][0]) == 3
    # ring of 3: every agent receives 2 models per round
    assert results["bytes_per_round"] == 3 * 2 * results["model_bytes"]
    assert results["calibration_images_per_agent"] == results["shard_sizes"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"]["dimat"]["merged"] == results["runs"]["dimat"]["merged"]
    md = (tmp_path / "results.md").read_text()
    assert "| DIMAT merged |" in md.replace("round | ", "") and "own" in md.lower()
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


def test_cli_arguments_build_the_config(tmp_path):
    parser = dz.add_decentralized_arguments(argparse.ArgumentParser())
    pi = tmp_path / "pi.json"
    pi.write_text(json.dumps({"pi": [[0.5, 0.5, 0], [0, 0.5, 0.5], [0.5, 0, 0.5]]}))
    args = parser.parse_args(
        ["--quick", "--topology", "fc", "--partition", "iid", "--rounds", "3",
         "--methods", "dimat,wa_bn", "--pi-file", str(pi)]
    )  # fmt: skip
    cfg = dz.config_from_args(args)
    assert (cfg.rounds, cfg.partition, cfg.methods, cfg.agents) == (3, "iid", ("dimat", "wa_bn"), 3)
    assert cfg.n_train == dz.QUICK["n_train"] and cfg.pi[0] == (0.5, 0.5, 0.0)
    with pytest.raises(ValueError, match="unknown method"):
        dz.run_decentralized(dz.quick_config(methods=("zipit",)))
