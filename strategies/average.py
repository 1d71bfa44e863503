"""Running weight average: merged_t = ((t−1)·merged_{t−1} + θ_t) / t (OPCM's continual baseline)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from contmerge.kernels import kernel
from contmerge.strategy import EntryFold, FoldContext, State, Strategy, TensorInfo


@dataclass
class Average(Strategy):
    """Running mean of the models (OPCM's continual baseline): θ0 + mean of the task vectors."""

    name = "average"
    elementwise = True

    def fold(
        self, info: TensorInfo, state: State, delta: Tensor, base: Tensor, ctx: FoldContext
    ) -> State:
        # the running mean of task vectors; θ0 + mean(τ) is the mean of the models
        mean = state["value"]
        return {"value": mean + (delta - mean) / ctx.index}

    def entry_fold(self, info: TensorInfo, ctx: FoldContext) -> EntryFold:
        # divide in the tensor's own dtype, as torch does with a Python number
        return EntryFold(_running_mean, (info.scalar(ctx.index),))

    def emit(
        self, info: TensorInfo, state: State, base: Tensor, globals: Mapping[str, Any]
    ) -> Tensor:
        return base + state["value"]


@kernel
def _running_mean(delta: Any, mean: Any, params: tuple[Any]) -> Any:
    (count,) = params
    return mean + (delta - mean) / count
