"""Split the pooled training samples of several tasks among federated clients.

A sample is ``(task, index)``; its label for label-skew splits is the pair ``(task, class)``.

- ``iid``: one random permutation of the pool, cut into equal parts.
- ``dirichlet:ALPHA``: for each (task, class) label, client shares drawn from Dir(ALPHA); small
  ALPHA = strong label skew (the usual non-IID benchmark split). Redrawn until every client has
  at least ``min_size`` samples.
- ``by-task``: each client holds whole tasks (client i gets tasks i, i+N, ...); with more clients
  than tasks, clients sharing a task split its samples. This is the continual-merging setting:
  each client fine-tunes on its own task.

Deterministic given the seed, so every client computes the same split and takes its own part.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Part = dict[int, np.ndarray]  # task position -> sorted sample indices of that task
PARTITION_HELP = "iid, dirichlet:ALPHA (e.g. dirichlet:0.3) or by-task"


def parse_partition(spec: str) -> tuple[str, float | None]:
    """``"dirichlet:0.3"`` -> ``("dirichlet", 0.3)``; validates the spec."""
    kind, _, arg = spec.strip().partition(":")
    if kind in ("iid", "by-task") and not arg:
        return kind, None
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            alpha = -1.0
        if alpha > 0:
            return kind, alpha
        raise ValueError(f"dirichlet needs a positive alpha, as in dirichlet:0.3 (got {spec!r})")
    raise ValueError(f"unknown partition {spec!r}; use {PARTITION_HELP}")


def partition(
    labels: Sequence[np.ndarray], num_partitions: int, spec: str, seed: int = 0, min_size: int = 8
) -> list[Part]:
    """Every client's samples: ``labels[t]`` are the class labels of task t's training set."""
    if num_partitions < 1:
        raise ValueError("need at least one partition")
    kind, alpha = parse_partition(spec)
    rng = np.random.default_rng(seed)
    if kind == "by-task":
        return _by_task([len(y) for y in labels], num_partitions, rng)
    pool = np.concatenate([np.stack([np.full(len(y), t), np.arange(len(y))], 1)
                           for t, y in enumerate(labels)])  # fmt: skip
    if kind == "iid":
        chunks = np.array_split(rng.permutation(len(pool)), num_partitions)
    else:
        assert alpha is not None
        joint = np.concatenate([t * 1_000_000 + np.asarray(y) for t, y in enumerate(labels)])
        chunks = _dirichlet(joint, num_partitions, alpha, rng, min_size)
    return [_as_part(pool[np.sort(chunk)]) for chunk in chunks]


def _dirichlet(
    joint: np.ndarray, n: int, alpha: float, rng: np.random.Generator, min_size: int
) -> list[np.ndarray]:
    min_size = min(min_size, len(joint) // n)
    for _ in range(100):
        chunks: list[list[np.ndarray]] = [[] for _ in range(n)]
        for label in np.unique(joint):
            idx = rng.permutation(np.flatnonzero(joint == label))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n))[:-1] * len(idx)).astype(int)
            for client, piece in enumerate(np.split(idx, cuts)):
                chunks[client].append(piece)
        merged = [np.concatenate(c) for c in chunks]
        if min(len(c) for c in merged) >= min_size:
            return merged
    raise ValueError(f"dirichlet:{alpha} left a client with < {min_size} samples 100 times")


def _by_task(sizes: list[int], n: int, rng: np.random.Generator) -> list[Part]:
    parts: list[Part] = [{} for _ in range(n)]
    if n <= len(sizes):
        for t, size in enumerate(sizes):
            parts[t % n][t] = np.arange(size)
        return parts
    for t, size in enumerate(sizes):
        holders = [c for c in range(n) if c % len(sizes) == t]
        for client, piece in zip(holders, np.array_split(rng.permutation(size), len(holders))):
            parts[client][t] = np.sort(piece)
    return parts


def _as_part(pairs: np.ndarray) -> Part:
    return {int(t): pairs[pairs[:, 0] == t, 1] for t in np.unique(pairs[:, 0])}
