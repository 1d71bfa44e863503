"""Client partitions of the pooled task data: disjoint, complete, deterministic, skewed as asked."""

from __future__ import annotations

import numpy as np
import pytest

from contmerge.simulations.federated.partition import parse_partition, partition


def _labels() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 10, size=n) for n in (300, 200, 120)]


def _pairs(parts: list[dict[int, np.ndarray]]) -> list[tuple[int, int]]:
    return [(t, int(i)) for part in parts for t, idx in part.items() for i in idx]


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.3", "dirichlet:100", "by-task"])
@pytest.mark.parametrize("clients", [2, 5])
def test_every_sample_goes_to_exactly_one_client(spec: str, clients: int) -> None:
    labels = _labels()
    parts = partition(labels, clients, spec, seed=3)
    assert len(parts) == clients
    pairs = _pairs(parts)
    assert len(pairs) == len(set(pairs)) == sum(len(y) for y in labels)
    assert all(sum(len(i) for i in part.values()) > 0 for part in parts)
    again = partition(labels, clients, spec, seed=3)
    assert _pairs(again) == pairs


def test_by_task_gives_whole_tasks_and_splits_them_when_clients_outnumber_tasks() -> None:
    labels = _labels()
    parts = partition(labels, 3, "by-task")
    assert [sorted(p) for p in parts] == [[0], [1], [2]]
    assert all(len(p[t]) == len(labels[t]) for t, p in enumerate(parts))
    parts = partition(labels, 4, "by-task")
    assert [sorted(p) for p in parts] == [[0], [1], [2], [0]]
    assert len(parts[0][0]) + len(parts[3][0]) == len(labels[0])


def test_small_alpha_skews_labels_more_than_iid() -> None:
    labels = _labels()

    def skew(parts: list[dict[int, np.ndarray]]) -> float:
        # mean over clients of the largest share one (task, class) label takes of its data
        shares = []
        for part in parts:
            joint = np.concatenate([t * 10 + labels[t][i] for t, i in part.items()])
            shares.append(np.bincount(joint).max() / len(joint))
        return float(np.mean(shares))

    assert skew(partition(labels, 4, "dirichlet:0.1")) > 2 * skew(partition(labels, 4, "iid"))


@pytest.mark.parametrize(
    "bad", ["", "dirichlet", "dirichlet:0", "dirichlet:x", "by-class", "iid:2"]
)
def test_bad_specs_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_partition(bad)
