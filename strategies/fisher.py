"""Fisher merging (Matena & Raffel, 2022) as a streaming sum: θ = Σ F_t θ_t / Σ F_t.

Each arrival brings its diagonal Fisher (same tensor names as the model). Kept in task-vector
space, θ0 + Σ F_t τ_t / Σ F_t, which is the same value with less rounding. Where every Fisher
is zero the entry falls back to the plain average, as a division by zero has no answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from contmerge.errors import CheckpointError
from contmerge.strategy import FoldContext, State, Strategy, TensorInfo
from contmerge.tensorfile import TensorMeta


@dataclass
class Fisher(Strategy):
    """Fisher merging (Matena & Raffel 2022): θ = Σ F_t θ_t / Σ F_t, each arrival bringing its
    diagonal Fisher (same tensor names and shapes as the model)."""

    name = "fisher"
    needs_extras = ("fisher",)

    def slots(self, info: TensorInfo) -> dict[str, TensorMeta]:
        meta = TensorMeta(info.shape, info.compute_dtype)
        return {"weighted": meta, "fisher": meta, "sum": meta}

    def fold(
        self, info: TensorInfo, state: State, delta: Tensor, base: Tensor, ctx: FoldContext
    ) -> State:
        fisher = ctx.extra("fisher", info.name).to(delta.dtype)
        if fisher.shape != delta.shape or bool((fisher < 0).any()) or not fisher.isfinite().all():
            raise CheckpointError(
                ctx.extras["fisher"].source,
                "Fisher must match the tensor's shape and be finite and ≥ 0",
                info.name,
            )
        return {
            "weighted": state["weighted"] + fisher * delta,
            "fisher": state["fisher"] + fisher,
            "sum": state["sum"] + delta,
        }

    def emit(
        self, info: TensorInfo, state: State, base: Tensor, globals: Mapping[str, Any]
    ) -> Tensor:
        count = max(globals.get("count", 0), 1)
        den = state["fisher"]
        weighted = state["weighted"] / torch.where(den > 0, den, torch.ones_like(den))
        return base + torch.where(den > 0, weighted, state["sum"] / count)
