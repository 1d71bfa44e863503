"""Continual TIES-Merging, in the form OPCM's authors compare against.

merged_1 = θ0 + λ·τ_1; then merged_t = merged_{t−1} + λ·TIES([merged_{t−1} − θ0, τ_t]), where
TIES works on the 2-row stack of whole-model flattened vectors: keep each row's top 20 % of
magnitudes (global over the model, threshold = the (d − ⌊0.2·d⌋)-th smallest |x|, entries ≥ it
kept), elect each position's sign as the sign of the column sum (zeros take the majority sign
over the model), and take the disjoint sum (or mean). λ = 0.3. The result depends on order.

Global thresholds and the majority sign are computed by streaming passes (contmerge.kth), so
memory stays constant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from contmerge.kth import KthSmallestAbs
from contmerge.strategy import FoldContext, Pass, State, Strategy, TensorInfo, setting


@dataclass
class ContinualTies(Strategy):
    """Continual TIES-Merging as OPCM's authors run it: TIES of [merged − θ0, τ_t] over the whole
    flattened model (global top-k % per row, sign election, disjoint sum), added with weight λ."""

    name = "ties"
    scaling_factor: float = setting(0.3, "weight of each TIES step added to the merge", symbol="λ")
    threshold: float = setting(
        20.0,
        "percent of each row's entries kept, by magnitude (the authors' reset_thresh), in (0, 100]",
    )
    merge_func: str = setting("sum", "how the sign-agreeing entries combine: 'sum' or 'mean'")

    def __post_init__(self) -> None:
        if self.merge_func not in ("sum", "mean"):
            raise ValueError(f"ties: merge_func must be 'sum' or 'mean', got {self.merge_func!r}")
        if not 0 < self.threshold <= 100:
            raise ValueError(f"ties: threshold is a percentage in (0, 100], got {self.threshold}")

    def passes(self, ctx: FoldContext) -> list[Pass]:
        if ctx.index == 1:
            return []
        d = ctx.numel
        k = d - int(d * self.threshold / 100)
        rows = [KthSmallestAbs(k, ctx.float64), KthSmallestAbs(k, ctx.float64)]
        digit_passes: list[Pass] = [_DigitPass(rows) for _ in range(rows[0].digits)]
        return [*digit_passes, _MajoritySignPass()]

    def fold(
        self, info: TensorInfo, state: State, delta: Tensor, base: Tensor, ctx: FoldContext
    ) -> State:
        merged = state["value"]
        if ctx.index == 1:
            return {"value": self.scaling_factor * delta}
        trimmed_merged, trimmed_delta = _trim(merged, delta, ctx)
        signs = _elected_signs(trimmed_merged, trimmed_delta, ctx.stats["majority_sign"])
        kept = [_agree(row, signs) for row in (trimmed_merged, trimmed_delta)]
        combined = kept[0] + kept[1]
        if self.merge_func == "mean":
            count = (kept[0] != 0).to(combined.dtype) + (kept[1] != 0).to(combined.dtype)
            combined = combined / count.clamp(min=1)
        return {"value": merged + self.scaling_factor * combined}

    def emit(
        self, info: TensorInfo, state: State, base: Tensor, globals: Mapping[str, Any]
    ) -> Tensor:
        return base + state["value"]


def _trim(merged: torch.Tensor, delta: torch.Tensor, ctx: FoldContext):
    t_merged, t_delta = ctx.stats["thresholds"]
    return merged * (merged.abs() >= t_merged), delta * (delta.abs() >= t_delta)


def _elected_signs(a: torch.Tensor, b: torch.Tensor, majority: float) -> torch.Tensor:
    signs = torch.sign(a + b)
    return torch.where(signs == 0, torch.as_tensor(majority, dtype=signs.dtype), signs)


def _agree(row: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    return row * torch.where(signs > 0, row > 0, row < 0)


class _DigitPass(Pass):
    """One radix digit of both rows' thresholds (merged task vector, arriving task vector)."""

    def __init__(self, rows: list[KthSmallestAbs]) -> None:
        self.rows = rows

    def update(self, info: TensorInfo, delta: Tensor, state: State, ctx: FoldContext) -> None:
        self.rows[0].update(state["value"])
        self.rows[1].update(delta)

    def finish(self, ctx: FoldContext) -> None:
        for row in self.rows:
            row.next_digit()
        if self.rows[0].done:
            ctx.stats["thresholds"] = (self.rows[0].value, self.rows[1].value)


class _MajoritySignPass(Pass):
    """Sign of the sum of elected signs over the whole model, for positions that sum to zero."""

    def __init__(self) -> None:
        self.total = 0.0

    def update(self, info: TensorInfo, delta: Tensor, state: State, ctx: FoldContext) -> None:
        trimmed = _trim(state["value"], delta, ctx)
        self.total += float(torch.sign(trimmed[0] + trimmed[1]).sum())

    def finish(self, ctx: FoldContext) -> None:
        ctx.stats["majority_sign"] = float(torch.sign(torch.tensor(self.total)))
