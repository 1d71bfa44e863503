"""RegMean (Jin et al., ICLR 2023) as streaming sums: W = (Σ W_t G_t)(Σ G_t)⁻¹ for linear weights.

Each arrival brings, per ``nn.Linear`` weight (out × in), the Gram matrix G_t = X_tᵀX_t (in × in)
of that layer's inputs on its own data. Off-diagonal entries are scaled by
``reduce_non_diagonal_ratio`` (RegMean's α; 1.0 = the plain formula). Kept in task-vector
space: W = W0 + (Σ τ_t G_t)(Σ G_t)⁻¹. Every other tensor is averaged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from contmerge.errors import CheckpointError
from contmerge.strategy import FoldContext, State, Strategy, TensorInfo, setting
from contmerge.tensorfile import TensorMeta


@dataclass
class RegMean(Strategy):
    """RegMean (Jin et al. 2023): W = (Σ W_t G_t)(Σ G_t)⁻¹ per nn.Linear weight, each arrival
    bringing the Gram matrix G_t = XᵀX of that layer's inputs; other tensors averaged."""

    name = "regmean"
    needs_extras = ("gram",)
    reduce_non_diagonal_ratio: float = setting(
        1.0, "scale of the Gram matrices' off-diagonal entries (1.0: the plain formula)", symbol="α"
    )

    def _regressed(self, info) -> bool:
        return info.is_linear and len(info.shape) == 2

    def slots(self, info: TensorInfo) -> dict[str, TensorMeta]:
        if not self._regressed(info):
            return {"sum": TensorMeta(info.shape, info.compute_dtype)}
        fan_in = info.shape[1]
        return {
            "weighted": TensorMeta(info.shape, info.compute_dtype),
            "gram": TensorMeta((fan_in, fan_in), info.compute_dtype),
        }

    def fold(
        self, info: TensorInfo, state: State, delta: Tensor, base: Tensor, ctx: FoldContext
    ) -> State:
        if not self._regressed(info):
            return {"sum": state["sum"] + delta}
        gram = ctx.extra("gram", info.name).to(delta.dtype)
        fan_in = info.shape[1]
        if gram.shape != (fan_in, fan_in) or not gram.isfinite().all():
            raise CheckpointError(
                ctx.extras["gram"].source,
                f"Gram matrix must be finite and {fan_in}×{fan_in}, got {tuple(gram.shape)}",
                info.name,
            )
        ratio = self.reduce_non_diagonal_ratio
        if ratio != 1.0:
            gram = ratio * gram + (1 - ratio) * torch.diag(torch.diagonal(gram))
        return {"weighted": state["weighted"] + delta @ gram, "gram": state["gram"] + gram}

    def emit(
        self, info: TensorInfo, state: State, base: Tensor, globals: Mapping[str, Any]
    ) -> Tensor:
        if not self._regressed(info):
            return base + state["sum"] / max(globals.get("count", 0), 1)
        gram, weighted = state["gram"], state["weighted"]
        # solve X·G = Σ τG for X; G is symmetric, so Gᵀ·Xᵀ = (Σ τG)ᵀ. lstsq copes with rank loss.
        solution = torch.linalg.lstsq(gram, weighted.T).solution.T
        return base + solution
