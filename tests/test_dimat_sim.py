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
        topology="ring", agents=3, rounds=2, n_train=300, n_test=150, width=4,
        output_dir=str(tmp_path),
    )  # fmt: skip
    results = dz.run_decentralized(cfg)
    out = capsys.readouterr().out
    assert "OWN training shard" in out and "alignability check" in out
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


def test_defaults_are_the_authors_where_they_differ():
    cfg = dz.DecentralizedConfig()
    assert (cfg.topology, cfg.fc_shortcut, cfg.bn_momentum) == ("fc", True, "cumulative")
    assert (cfg.rounds, cfg.local_epochs, cfg.pretrain_epochs) == (100, 2, 100)
    assert (cfg.batch_size, cfg.lr) == (100, 1e-3)


def test_fc_shortcut_run_checks_alignability_and_counts_a_star(tmp_path):
    cfg = dz.quick_config(
        agents=4, rounds=2, n_train=400, n_test=200, width=16, partition="iid",
        pretrain_epochs=3, output_dir=str(tmp_path), progress=False,
    )  # fmt: skip
    results = dz.run_decentralized(cfg)
    assert results["shortcut"] and results["topology"]["name"] == "fc"
    # agent 0 receives 3 models and sends its merge back to 3 agents
    assert results["bytes_per_round"] == 2 * 3 * results["model_bytes"]
    for method in ("dimat", "wa"):
        merged = results["runs"][method]["merged_per_agent"]
        assert all(len(set(row)) == 1 for row in merged)  # everyone holds agent 0's merge
    check = results["alignability"]
    assert check["pair"]["agents"] == 2 and check["all"]["agents"] == 4
    for which in ("pair", "all"):
        c = check[which]
        assert all(0.0 <= c[k] <= 1.0 for k in ("endpoints", "dimat", "wa", "identity"))
        assert c["matched_corr"] >= c["diagonal_corr"]
    assert check["endpoints"] == pytest.approx(results["initial_accuracy"])
    # DIMAT's rounds record how far the assignments are from the identity; WA's have none
    assert all(0.0 <= m["identity"] <= 1.0 for m in results["runs"]["dimat"]["matching"])
    assert results["runs"]["wa"]["matching"] == [{}, {}]
    assert "alignability check" in (tmp_path / "results.md").read_text()


def test_training_after_a_reset_uses_the_references_cumulative_batchnorm():
    factory = dz.agent_model("mlp", 8, 10)[0]
    state = factory().state_dict()
    bn = [m for m in dz.trainable(factory, state, "dimat", "cumulative").modules()
          if isinstance(m, torch.nn.BatchNorm1d)]  # fmt: skip
    assert bn and all(m.momentum is None for m in bn)
    for method, mode in (("wa", "cumulative"), ("dimat", "restore"), (None, "cumulative")):
        model = dz.trainable(factory, state, method, mode)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
        assert all(m.momentum == 0.1 for m in norms)
    with pytest.raises(ValueError, match="bn_momentum"):
        dz.trainable(factory, state, "dimat", "none")


def test_shortcut_only_for_fc_or_equal_custom_rows():
    from contmerge.strategies.dimat import make_topology, topology_from_matrix

    assert dz.uses_shortcut(make_topology("fc", 3), True)
    assert not dz.uses_shortcut(make_topology("fc", 3), False)
    assert not dz.uses_shortcut(make_topology("ring", 3), True)  # same π as FC, not FC
    assert dz.uses_shortcut(topology_from_matrix([[0.5, 0.5], [0.5, 0.5]]), True)
    ring = make_topology("ring", 5)
    assert dz.round_bytes(ring, 10, True) == 5 * 2 * 10


def test_new_cli_options_build_the_config():
    parser = dz.add_decentralized_arguments(argparse.ArgumentParser())
    cfg = dz.config_from_args(
        parser.parse_args(["--model", "cnn", "--width", "8", "--bn-momentum", "restore",
                           "--no-fc-shortcut", "--no-alignability"])
    )  # fmt: skip
    assert (cfg.model, cfg.width, cfg.bn_momentum) == ("cnn", 8, "restore")
    assert not cfg.fc_shortcut and not cfg.alignability
    assert dz.config_from_args(parser.parse_args([])).fc_shortcut
