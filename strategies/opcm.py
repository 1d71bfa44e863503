"""OPCM (Tang et al., 2025, "Merging Models on the Fly Without Retraining").

State: the un-normalised merged task vector S, the sum of arrival norms, and ‖S‖ (globals).
- First arrival: S = τ_1.
- Later arrivals: for each ``nn.Linear`` weight with S_p ≠ 0, thin SVD S_p = U Σ Vᵀ, split rank
  r = first index where cumsum(σ)/Σσ > α (0 if none); C = Uᵀ τ_p V; the entries of C on the
  diagonal or in the top-left r×r block are removed from τ_p; S_p += the rest. Every other
  tensor: S_p += τ_p.
- Emit θ0 + S · (mean arrival norm / ‖S‖): the global rescale of the authors' code.

Keeping S instead of (merged model, λ_t) is the same algorithm: SVD bases and the σ shares do not
change under positive scaling. Norms run over every float tensor of the model, as in the code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from contmerge.strategy import FoldContext, State, Strategy, TensorInfo, setting


def split_rank(singular_values: torch.Tensor, alpha: float) -> int:
    """First index whose cumulative share of Σσ is strictly above α; 0 if none is."""
    share = torch.cumsum(singular_values, 0) / singular_values.sum()
    above = torch.nonzero(share > alpha)
    return int(above[0]) if len(above) else 0


def project_out(merged: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """τ minus its components on the diagonal and top-left r×r block of merged's SVD basis."""
    work = merged if merged.dtype in (torch.float32, torch.float64) else merged.float()
    u, sigma, vh = torch.linalg.svd(work, full_matrices=False)
    if float(sigma.sum()) == 0.0:
        return delta
    rank = split_rank(sigma, alpha)
    d = delta.to(work.dtype)
    coeffs = u.T @ d @ vh.T
    mask = torch.eye(*coeffs.shape, dtype=torch.bool)
    mask[:rank, :rank] = True
    removed = u @ (coeffs * mask) @ vh
    return (d - removed).to(delta.dtype)


@dataclass
class OPCM(Strategy):
    """OPCM (Tang et al. 2025): each new task vector is projected off the merged update's
    singular diagonal and top-r block (per nn.Linear weight), other tensors summed; the merge
    is rescaled to the mean arrival norm."""

    name = "opcm"
    alpha: float = setting(
        0.5,
        "share of Σσ that sets the projected rank r (first cumulative share above α), in [0, 1)",
        symbol="α",
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(
                f"opcm: alpha must be in [0, 1) (the paper keeps it below 1), got {self.alpha}"
            )

    def init_globals(self) -> dict[str, Any]:
        return {"norm_sum": 0.0, "merged_norm": 0.0}

    def fold(
        self, info: TensorInfo, state: State, delta: Tensor, base: Tensor, ctx: FoldContext
    ) -> State:
        merged = state["value"]
        if ctx.index > 1 and info.is_linear and len(info.shape) == 2 and merged.any():
            delta_kept = project_out(merged, delta, self.alpha)
        else:
            delta_kept = delta
        new = merged + delta_kept
        ctx.add_stat("delta_sq", float(torch.sum(delta.double() ** 2)))
        ctx.add_stat("merged_sq", float(torch.sum(new.double() ** 2)))
        return {"value": new}

    def end_fold(self, globals: Mapping[str, Any], ctx: FoldContext) -> dict[str, Any]:
        return {
            "norm_sum": globals["norm_sum"] + math.sqrt(ctx.stats.get("delta_sq", 0.0)),
            "merged_norm": math.sqrt(ctx.stats.get("merged_sq", 0.0)),
        }

    def emit(
        self, info: TensorInfo, state: State, base: Tensor, globals: Mapping[str, Any]
    ) -> Tensor:
        count = globals.get("count", 0)
        if count == 0 or globals["merged_norm"] == 0.0:
            return base.clone()
        scale = (globals["norm_sum"] / count) / globals["merged_norm"]
        return base + state["value"] * scale
