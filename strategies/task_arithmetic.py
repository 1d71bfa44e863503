"""Continual task arithmetic: θ0 + λ·Σ_t τ_t, λ = 0.3 (order does not matter)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from contmerge.kernels import kernel
from contmerge.strategy import Arrays, FoldContext, State, Strategy, TensorInfo


@dataclass
class TaskArithmetic(Strategy):
    name = "task_arithmetic"
    elementwise = True
    scaling_factor: float = 0.3

    def fold(
        self, info: TensorInfo, state: State, delta: Tensor, base: Tensor, ctx: FoldContext
    ) -> State:
        return {"value": state["value"] + delta}

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
        _add(state["value"], delta, out["value"])

    def emit(
        self, info: TensorInfo, state: State, base: Tensor, globals: Mapping[str, Any]
    ) -> Tensor:
        return base + self.scaling_factor * state["value"]


@kernel
def _add(total: np.ndarray, delta: np.ndarray, out: np.ndarray) -> None:
    for i in range(total.size):
        out[i] = total[i] + delta[i]
