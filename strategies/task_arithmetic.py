"""Continual task arithmetic: θ0 + λ·Σ_t τ_t, λ = 0.3 (order does not matter); with
per-arrival weights (``--weight``), θ0 + λ·Σ_t w_t τ_t."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from contmerge.kernels import kernel
from contmerge.strategy import EntryFold, FoldContext, State, Strategy, TensorInfo, setting


@dataclass
class TaskArithmetic(Strategy):
    """Continual task arithmetic: θ0 + λ·Σ τ_t over every arrival (order does not matter)."""

    name = "task_arithmetic"
    elementwise = True
    scaling_factor: float = setting(0.3, "weight of the summed task vectors", symbol="λ")

    takes_weight = True

    def fold(
        self, info: TensorInfo, state: State, delta: Tensor, base: Tensor, ctx: FoldContext
    ) -> State:
        if ctx.weight != 1:  # per-arrival weight: θ0 + λ·Σ w_t τ_t
            delta = ctx.weight * delta
        return {"value": state["value"] + delta}

    def entry_fold(self, info: TensorInfo, ctx: FoldContext) -> EntryFold:
        if ctx.weight != 1:
            return EntryFold(_add_weighted, (info.scalar(ctx.weight),))
        return EntryFold(_add)

    def emit(
        self, info: TensorInfo, state: State, base: Tensor, globals: Mapping[str, Any]
    ) -> Tensor:
        return base + self.scaling_factor * state["value"]


@kernel
def _add(delta: Any, total: Any, params: tuple[()]) -> Any:
    return total + delta


@kernel
def _add_weighted(delta: Any, total: Any, params: tuple[Any]) -> Any:
    (weight,) = params
    return total + weight * delta
