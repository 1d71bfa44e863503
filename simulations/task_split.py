"""Real classification tasks of the transformer scenarios, and their class-balanced splits.

A ``LabelledTask`` holds raw inputs (strings for text, float images for vision) with integer
labels; the loaders in ``text_tasks`` and ``vision_tasks`` build them from installed files.
Splits are class-balanced and deterministic given a seed, so every class has training examples
(its head is the class mean of θ0's features) and a rare class cannot vanish from a test set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class LabelledTask:
    """One downstream task: train/test inputs and labels, and its class names."""

    name: str
    x_train: Any  # list[str] or a float tensor of images
    y_train: torch.Tensor
    x_test: Any
    y_test: torch.Tensor
    classes: tuple[str, ...]
    source: str  # where the data comes from, for the report

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def task_rng(seed: int, *parts: str) -> np.random.Generator:
    """A generator seeded by the seed and names (hashlib: stable across processes)."""
    digest = hashlib.sha256("/".join([str(seed), *parts]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def balanced_split(
    labels: Sequence[int] | np.ndarray,
    n_train: int,
    n_test: int,
    rng: np.random.Generator,
    *,
    test_share: float = 0.3,
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, test) index arrays, each drawn class by class in turns.

    Each class's examples are shuffled and cut into a test pool (``test_share``) and a train
    pool; then classes give one example each in turn until ``n`` are drawn or the pools run dry.
    """
    y = np.asarray(labels)
    pools_train: list[list[int]] = []
    pools_test: list[list[int]] = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c)).tolist()
        cut = max(1, int(round(test_share * len(idx)))) if len(idx) > 1 else 0
        pools_test.append(idx[:cut])
        pools_train.append(idx[cut:])
    return _round_robin(pools_train, n_train), _round_robin(pools_test, n_test)


def _round_robin(pools: list[list[int]], n: int) -> np.ndarray:
    out: list[int] = []
    depth = 0
    while len(out) < n and any(depth < len(p) for p in pools):
        for p in pools:
            if depth < len(p) and len(out) < n:
                out.append(p[depth])
        depth += 1
    return np.sort(np.asarray(out, dtype=np.int64))


def make_task(
    name: str,
    inputs: Sequence[Any] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    classes: Sequence[str],
    source: str,
    *,
    n_train: int,
    n_test: int,
    seed: int,
) -> LabelledTask:
    """Split ``inputs``/``labels`` into a balanced task; classes with no example are dropped."""
    y = np.asarray(labels, dtype=np.int64)
    present = np.unique(y)
    remap = np.full(len(classes), -1, dtype=np.int64)
    remap[present] = np.arange(len(present))
    itr, ite = balanced_split(y, n_train, n_test, task_rng(seed, name, "split"))

    def pick(idx: np.ndarray) -> Any:
        if isinstance(inputs, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(inputs[idx]))
        return [inputs[i] for i in idx]

    return LabelledTask(
        name=name,
        x_train=pick(itr),
        y_train=torch.from_numpy(remap[y[itr]]),
        x_test=pick(ite),
        y_test=torch.from_numpy(remap[y[ite]]),
        classes=tuple(classes[i] for i in present),
        source=source,
    )
