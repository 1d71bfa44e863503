"""Running weight average: merged_t = ((t−1)·merged_{t−1} + θ_t) / t (OPCM's continual baseline)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from contmerge.kernels import kernel
from contmerge.strategy import Arrays, FoldContext, State, Strategy, TensorInfo


@dataclass
class Average(Strategy):
    name = "average"
    elementwise = True

    def fold(
        self, info: TensorInfo, state: State, delta: Tensor, base: Tensor, ctx: FoldContext
    ) -> State:
        # the running mean of task vectors; θ0 + mean(τ) is the mean of the models
        mean = state["value"]
        return {"value": mean + (delta - mean) / ctx.index}

    def fold_into(
        self,
        info: TensorInfo,
        out: Arrays,
        state: Arrays,
        delta: np.ndarray,
        base: np.ndarray,
        ctx: FoldContext,
        start: int,
    ) -> None:
        mean = state["value"]
        # divide in the tensor's own dtype, as torch does with a Python number
        _running_mean(mean, delta, mean.dtype.type(ctx.index), out["value"])

    def emit(
        self, info: TensorInfo, state: State, base: Tensor, globals: Mapping[str, Any]
    ) -> Tensor:
        return base + state["value"]


@kernel
def _running_mean(mean: np.ndarray, delta: np.ndarray, count: Any, out: np.ndarray) -> None:
    for i in range(mean.size):
        out[i] = mean[i] + (delta[i] - mean[i]) / count
