"""DIMAT through Flower's simulation engine: the server relays, the clients merge and train."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

from contmerge.simulations import decentralized as dz  # noqa: E402
from contmerge.simulations.decentralized_flower import (  # noqa: E402
    config_from_json,
    config_to_json,
    run_decentralized_flower,
)


def test_config_round_trips_through_json():
    cfg = dz.quick_config(methods=("dimat", "wa_bn"), pi=((0.5, 0.5), (0.5, 0.5)))
    assert config_from_json(config_to_json(cfg)) == cfg


def check_flower_reproduces_the_in_process_simulation(**overrides):
    cfg = dz.quick_config(
        agents=3, rounds=2, n_train=600, n_test=200, width=8, partition="iid",
        pretrain_epochs=2, output_dir=None, progress=False, **overrides,
    )  # fmt: skip
    flower = run_decentralized_flower(cfg)
    local = dz.run_decentralized(cfg)
    assert flower["initial_accuracy"] == local["initial_accuracy"]
    for method in ("dimat", "wa"):
        # same seeds, same data, bit-exact transport: the same numbers, round by round
        assert flower["runs"][method]["merged"] == local["runs"][method]["merged"]
        assert flower["runs"][method]["trained"] == local["runs"][method]["trained"]
    assert flower["runs"]["dimat"]["merged"] != flower["runs"]["wa"]["merged"]


@pytest.mark.slow
def test_flower_run_reproduces_the_in_process_simulation():
    # the default: FC with the authors' shortcut (agent 0 merges, every agent trains its merge)
    check_flower_reproduces_the_in_process_simulation()


@pytest.mark.slow
def test_flower_run_without_the_shortcut_reproduces_the_in_process_simulation():
    check_flower_reproduces_the_in_process_simulation(fc_shortcut=False)
