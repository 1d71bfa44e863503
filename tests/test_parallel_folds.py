"""The engine's whole-tensor folds on several threads (``per_tensor_parallel``): results and
``add_stat`` sums are handed on in tensor order, whatever order the threads finish in."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from contmerge import Merger
from contmerge.parallel_folds import ParallelFolds
from contmerge.strategy import FoldContext, State, Strategy, TensorInfo
from contmerge.tensorfile import TensorMeta


@dataclass
class SlowFirst(Strategy):
    """Adds δ; the earlier a tensor comes, the longer its fold takes (threads finish in reverse)."""

    name = "slow_first"
    per_tensor_parallel = True

    def fold(
        self, info: TensorInfo, state: State, delta: torch.Tensor, base: torch.Tensor, ctx
    ) -> State:
        position = int(info.name.split(".")[1])
        time.sleep(0.02 * (8 - position))
        ctx.add_stat("sum", float(delta.sum()))
        ctx.add_stat("sum", 1e-9 * position)  # two calls per key: their order shows in the sum
        return {"value": state["value"] + delta}

    def end_fold(self, globals: Mapping[str, Any], ctx: FoldContext) -> dict[str, Any]:
        return {"sum": ctx.stats["sum"]}

    def emit(self, info, state, base, globals) -> torch.Tensor:
        return base + state["value"]


def _info(k: int) -> TensorInfo:
    return TensorInfo(f"layer.{k}.weight", TensorMeta((3, 4), torch.float32), True, torch.float32)


def test_results_and_stats_are_handed_on_in_tensor_order() -> None:
    ctx = FoldContext(index=2, globals={}, stats={"threshold": 0.5})
    written: list[str] = []
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(3, 4, generator=g) for _ in range(8)]
    with ParallelFolds(SlowFirst(), ctx, 4, lambda name, state: written.append(name)) as folds:
        for k, delta in enumerate(deltas):
            folds.submit(_info(k), {"value": torch.zeros(3, 4)}, delta, torch.zeros(3, 4))
        folds.drain()
    assert written == [f"layer.{k}.weight" for k in range(8)]
    expected = 0.0
    for k, delta in enumerate(deltas):  # the sum one thread makes, in the same order
        expected += float(delta.sum())
        expected += 1e-9 * k
    assert ctx.stats["sum"] == expected  # bit for bit
    assert ctx.stats["threshold"] == 0.5  # what the passes left is kept


def test_torch_threads_are_one_per_fold_and_restored() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []

    @dataclass
    class Probe(SlowFirst):
        def fold(self, info, state, delta, base, ctx) -> State:
            seen.append(torch.get_num_threads())
            return {"value": state["value"] + delta}

    ctx = FoldContext(index=1, globals={})
    with ParallelFolds(Probe(), ctx, 2, lambda *_: None) as folds:
        folds.submit(_info(0), {"value": torch.zeros(3, 4)}, torch.ones(3, 4), torch.zeros(3, 4))
        folds.drain()
    assert seen == [1]
    assert torch.get_num_threads() == before


def test_an_error_in_one_fold_leaves_the_state_untouched(tmp_path) -> None:
    @dataclass
    class FailsOnThird(SlowFirst):
        def fold(self, info, state, delta, base, ctx) -> State:
            if info.name == "layer.3.weight":
                raise RuntimeError("boom in layer 3")
            return super().fold(info, state, delta, base, ctx)

    base = {f"layer.{k}.weight": torch.zeros(3, 4) for k in range(8)}
    arrival = {n: torch.ones(3, 4) for n in base}
    merger = Merger(base, SlowFirst(), tmp_path / "state", workers=4)
    merger.fold(arrival)
    merger.strategy = FailsOnThird()  # same state, a fold that fails midway
    with pytest.raises(RuntimeError, match="layer 3"):
        merger.fold({n: 2 * v for n, v in arrival.items()})
    assert merger.count == 1
    merged = merger.emit_state_dict()
    assert all(torch.equal(merged[n], torch.ones(3, 4)) for n in base)
    merger.close()
