"""MagMax (Marczak et al., ECCV 2024): keep, per entry, the task-vector value of largest magnitude.

τ_max ← τ_t where |τ_t| ≥ |τ_max| (ties go to the later model, as in the authors' fold);
emit θ0 + λ·τ_max with λ = 0.5. Max-magnitude selection is associative, so the fold is exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from contmerge.kernels import kernel
from contmerge.strategy import Arrays, FoldContext, State, Strategy, TensorInfo


@dataclass
class MagMax(Strategy):
    name = "magmax"
    elementwise = True
    scaling_factor: float = 0.5

    def fold(
        self, info: TensorInfo, state: State, delta: Tensor, base: Tensor, ctx: FoldContext
    ) -> State:
        best = state["value"]
        return {"value": torch.where(delta.abs() >= best.abs(), delta, best)}

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
        _keep_larger(delta, state["value"], out["value"])

    def emit(
        self, info: TensorInfo, state: State, base: Tensor, globals: Mapping[str, Any]
    ) -> Tensor:
        return base + self.scaling_factor * state["value"]


@kernel
def _keep_larger(delta: np.ndarray, best: np.ndarray, out: np.ndarray) -> None:
    # torch's CPU ``where`` branches per entry; this loop compiles to a vector blend
    for i in range(delta.size):
        out[i] = delta[i] if abs(delta[i]) >= abs(best[i]) else best[i]
