"""MagMax (Marczak et al., ECCV 2024): keep, per entry, the task-vector value of largest magnitude.

τ_max ← τ_t where |τ_t| ≥ |τ_max| (ties go to the later model, as in the authors' fold);
emit θ0 + λ·τ_max with λ = 0.5. Max-magnitude selection is associative, so the fold is exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from contmerge.kernels import kernel
from contmerge.strategy import EntryFold, FoldContext, State, Strategy, TensorInfo, setting


@dataclass
class MagMax(Strategy):
    """MagMax (Marczak et al. 2024): per entry, the task-vector value of largest magnitude
    (ties go to the later model), emitted as θ0 + λ·τ_max."""

    name = "magmax"
    elementwise = True
    scaling_factor: float = setting(0.5, "weight of the max-magnitude task vector", symbol="λ")

    def fold(
        self, info: TensorInfo, state: State, delta: Tensor, base: Tensor, ctx: FoldContext
    ) -> State:
        best = state["value"]
        return {"value": torch.where(delta.abs() >= best.abs(), delta, best)}

    def entry_fold(self, info: TensorInfo, ctx: FoldContext) -> EntryFold:
        return EntryFold(_keep_larger)

    def emit(
        self, info: TensorInfo, state: State, base: Tensor, globals: Mapping[str, Any]
    ) -> Tensor:
        return base + self.scaling_factor * state["value"]


@kernel
def _keep_larger(delta: Any, best: Any, params: tuple[()]) -> Any:
    # torch's CPU ``where`` branches per entry; in a compiled loop this is a vector blend
    return delta if abs(delta) >= abs(best) else best
