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

from contmerge.strategy import FoldContext, State, Strategy, TensorInfo


@dataclass
class MagMax(Strategy):
    name = "magmax"
    scaling_factor: float = 0.5

    def fold(
        self, info: TensorInfo, state: State, delta: Tensor, base: Tensor, ctx: FoldContext
    ) -> State:
        best = state["value"]
        return {"value": torch.where(delta.abs() >= best.abs(), delta, best)}

    def emit(
        self, info: TensorInfo, state: State, base: Tensor, globals: Mapping[str, Any]
    ) -> Tensor:
        return base + self.scaling_factor * state["value"]
