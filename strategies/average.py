"""Running weight average: merged_t = ((t−1)·merged_{t−1} + θ_t) / t (OPCM's continual baseline).

With per-arrival weights w_t (``--weight``), the weighted running mean Σ w_t θ_t / Σ w_t.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from contmerge.kernels import kernel
from contmerge.strategy import EntryFold, FoldContext, State, Strategy, TensorInfo

#: Σ w of the arrivals folded so far, in the state's globals
WEIGHT_SUM = "weight_sum"


@dataclass
class Average(Strategy):
    """Running mean of the models (OPCM's continual baseline): θ0 + mean of the task vectors."""

    name = "average"
    elementwise = True
    takes_weight = True

    def fold(
        self, info: TensorInfo, state: State, delta: Tensor, base: Tensor, ctx: FoldContext
    ) -> State:
        # the running mean of task vectors; θ0 + mean(τ) is the mean of the models
        mean = state["value"]
        return {"value": mean + (delta - mean) / _divisor(ctx)}

    def entry_fold(self, info: TensorInfo, ctx: FoldContext) -> EntryFold:
        # divide in the tensor's own dtype, as torch does with a Python number
        return EntryFold(_running_mean, (info.scalar(_divisor(ctx)),))

    def end_fold(self, globals: Mapping[str, Any], ctx: FoldContext) -> dict[str, Any]:
        return {**globals, WEIGHT_SUM: _weight_sum(ctx)}

    def emit(
        self, info: TensorInfo, state: State, base: Tensor, globals: Mapping[str, Any]
    ) -> Tensor:
        return base + state["value"]


def _weight_sum(ctx: FoldContext) -> float:
    """Σ w over the arrivals folded so far, this one included (states made before weights
    existed folded every arrival at weight 1)."""
    return float(ctx.globals.get(WEIGHT_SUM, ctx.index - 1)) + ctx.weight


def _divisor(ctx: FoldContext) -> float:
    """mean_t = mean + (w / Σw)(τ − mean); as one division, which is ``ctx.index`` exactly when
    every weight is 1 (sums of ones are exact), so unweighted folds are as before."""
    return _weight_sum(ctx) / ctx.weight


@kernel
def _running_mean(delta: Any, mean: Any, params: tuple[Any]) -> Any:
    (count,) = params
    return mean + (delta - mean) / count
