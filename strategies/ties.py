"""Continual TIES-Merging, in the form OPCM's authors compare against.

merged_1 = θ0 + λ·τ_1; then merged_t = merged_{t−1} + λ·TIES([merged_{t−1} − θ0, τ_t]), where
TIES works on the 2-row stack of whole-model flattened vectors: keep each row's top 20 % of
magnitudes (global over the model, threshold = the (d − ⌊0.2·d⌋)-th smallest |x|, entries ≥ it
kept), elect each position's sign as the sign of the column sum (zeros take the majority sign
over the model), and take the disjoint sum (or mean). λ = 0.3. The result depends on order.

Global thresholds and the majority sign are computed by streaming passes (contmerge.kth), so
memory stays constant. Once they are known, every entry folds on its own: the fold is
elementwise (one compiled loop per chunk, ``entry_fold``), and so are the passes (compiled
counts over chunks, on the engine's fold threads); ``fold`` is the torch reference.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from contmerge.kernels import kernel
from contmerge.kth import MAX_CANDIDATES, KthSmallestAbs, kth_in_window, sample_window
from contmerge.strategy import (
    Arrays,
    EntryFold,
    FoldContext,
    Pass,
    State,
    Strategy,
    TensorInfo,
    setting,
)


@dataclass
class ContinualTies(Strategy):
    """Continual TIES-Merging as OPCM's authors run it: TIES of [merged − θ0, τ_t] over the whole
    flattened model (global top-k % per row, sign election, disjoint sum), added with weight λ."""

    name = "ties"
    elementwise = True
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

    def passes(self, ctx: FoldContext) -> Iterator[Pass]:
        if ctx.index == 1:
            return
        d = ctx.numel
        k = d - int(d * self.threshold / 100)
        rows = [KthSmallestAbs(k, ctx.float64), KthSmallestAbs(k, ctx.float64)]
        # a look at a sample, then one exact pass for both thresholds and the majority sign
        sample = _SamplePass(k)
        yield sample
        yield _WindowPass(k, sample.windows(d), ctx.float64)
        if "majority_sign" in ctx.stats:
            return
        # the k-th value fell outside its window (or too many entries were inside): the
        # radix select, one pass per digit, and the majority sign on its own
        yield from (_DigitPass(rows) for _ in range(rows[0].digits))
        yield _MajoritySignPass()

    def fold(
        self, info: TensorInfo, state: State, delta: Tensor, base: Tensor, ctx: FoldContext
    ) -> State:
        home = delta.device  # whole tensors (an adapter's δ) are worked on on --device
        merged, delta = ctx.to_device(state["value"], delta)
        if ctx.index == 1:
            return {"value": (self.scaling_factor * delta).to(home)}
        trimmed_merged, trimmed_delta = _trim(merged, delta, ctx)
        signs = _elected_signs(trimmed_merged, trimmed_delta, ctx.stats["majority_sign"])
        kept = [_agree(row, signs) for row in (trimmed_merged, trimmed_delta)]
        combined = kept[0] + kept[1]
        if self.merge_func == "mean":
            count = (kept[0] != 0).to(combined.dtype) + (kept[1] != 0).to(combined.dtype)
            combined = combined / count.clamp(min=1)
        return {"value": (merged + self.scaling_factor * combined).to(home)}

    def entry_fold(self, info: TensorInfo, ctx: FoldContext) -> EntryFold:
        lam = info.scalar(self.scaling_factor)
        if ctx.index == 1:
            return EntryFold(_scaled, (lam,))
        t_merged, t_delta = ctx.stats["thresholds"]
        params = (
            lam,
            info.scalar(t_merged),
            info.scalar(t_delta),
            info.scalar(ctx.stats["majority_sign"]),
            self.merge_func == "mean",
            info.scalar(0.0),
            info.scalar(1.0),
        )
        return EntryFold(_ties_entry, params)

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


# The compiled entry functions mirror the torch reference operation for operation: masks are
# multiplications by 1 or 0 of the compute dtype (numba would widen a bool or an int times a
# float32 to float64), so even the signs of zeros agree; tests hold them equal bit for bit. They
# are written without branches (selects and bitwise ``&``/``|`` on bools) so that the loop
# around them vectorises: with branches its streaming stores go out one entry at a time, >10×
# slower.


@kernel
def _scaled(delta: Any, old: Any, params: tuple[Any]) -> Any:
    return params[0] * delta


@kernel
def _trimmed(value: Any, threshold: Any, zero: Any, one: Any) -> Any:
    return value * (one if abs(value) >= threshold else zero)


@kernel(error_model="numpy")  # a division by 0 is inf, not a ZeroDivisionError check per entry
def _ties_entry(delta: Any, old: Any, params: tuple[Any, ...]) -> Any:
    lam, t_merged, t_delta, majority, mean, zero, one = params
    a = _trimmed(old, t_merged, zero, one)
    b = _trimmed(delta, t_delta, zero, one)
    total = a + b
    elected = one if total > zero else (-one if total < zero else majority)
    up, down = elected > zero, elected <= zero  # torch: where(sign > 0, row > 0, row < 0)
    kept_a = a * (one if (up & (a > zero)) | (down & (a < zero)) else zero)
    kept_b = b * (one if (up & (b > zero)) | (down & (b < zero)) else zero)
    combined = kept_a + kept_b
    count = (one if kept_a != zero else zero) + (one if kept_b != zero else zero)
    averaged = combined / (count if count > one else one)
    return old + lam * (averaged if mean else combined)


@kernel
def _sign_sum(
    old: np.ndarray, delta: np.ndarray, t_merged: Any, t_delta: Any, zero: Any, one: Any
) -> int:
    """Σ sign(trim(old) + trim(δ)) over a chunk, as an exact integer."""
    total = 0
    for i in range(old.size):
        s = _trimmed(old[i], t_merged, zero, one) + _trimmed(delta[i], t_delta, zero, one)
        total += (s > 0) - (s < 0)
    return total


@kernel
def _window_chunk(
    old: np.ndarray,
    delta: np.ndarray,
    windows: tuple[Any, Any, Any, Any],
    zero: Any,
    one: Any,
    pairs_old: np.ndarray,
    pairs_delta: np.ndarray,
) -> tuple[int, int, int, int]:
    """One chunk of the exact pass: per row, the entries below its window are counted; a column
    whose two entries are outside their windows is kept or trimmed for sure and adds its
    elected sign to the total; the columns with an entry inside a window wait (``pairs_*``).

    Two loops: the first, without branches, vectorises; the second only gathers the rare
    waiting columns (one loop doing both ran 1.7× slower, measured)."""
    lo_old, hi_old, lo_delta, hi_delta = windows
    below_old = below_delta = total = 0
    for i in range(old.size):
        a, b = old[i], delta[i]
        ma, mb = abs(a), abs(b)
        below_old += ma < lo_old
        below_delta += mb < lo_delta
        waits = ((ma >= lo_old) & (ma <= hi_old)) | ((mb >= lo_delta) & (mb <= hi_delta))
        s = a * (one if ma > hi_old else zero) + b * (one if mb > hi_delta else zero)
        total += ((s > zero) - (s < zero)) * (not waits)
    waiting = 0
    for i in range(old.size):
        a, b = old[i], delta[i]
        ma, mb = abs(a), abs(b)
        if ((ma >= lo_old) & (ma <= hi_old)) | ((mb >= lo_delta) & (mb <= hi_delta)):
            pairs_old[waiting] = a
            pairs_delta[waiting] = b
            waiting += 1
    return below_old, below_delta, waiting, total


#: entries of a whole tensor handed to the exact pass at a time
BLOCK = 1 << 18


class _DigitPass(Pass):
    """One radix digit of both rows' thresholds (merged task vector, arriving task vector)."""

    elementwise = True

    def __init__(self, rows: list[KthSmallestAbs]) -> None:
        self.rows = rows

    def update(self, info: TensorInfo, delta: Tensor, state: State, ctx: FoldContext) -> None:
        self.rows[0].update(state["value"])
        self.rows[1].update(delta)

    def update_chunk(
        self, info: TensorInfo, delta: np.ndarray, state: Arrays, ctx: FoldContext, start: int
    ) -> None:
        self.rows[0].update_array(state["value"])
        self.rows[1].update_array(delta)

    def finish(self, ctx: FoldContext) -> None:
        for row in self.rows:
            row.next_digit()
        if self.rows[0].done:
            ctx.stats["thresholds"] = (self.rows[0].value, self.rows[1].value)


class _SamplePass(_DigitPass):
    """Each row's first-digit counts over every 61st entry: where its k-th lies. A prime
    stride, so that the sample crosses every column of a row-major matrix (a prefix of each
    chunk, a few rows, missed the thresholds of low-rank deltas)."""

    sample = 61

    def __init__(self, k: int) -> None:
        super().__init__([KthSmallestAbs(k), KthSmallestAbs(k)])  # float32 bits, any dtype

    def update(self, info: TensorInfo, delta: Tensor, state: State, ctx: FoldContext) -> None:
        for row, values in zip(self.rows, (state["value"], delta)):
            row.update(values.reshape(-1)[:: self.sample].contiguous())

    def finish(self, ctx: FoldContext) -> None:
        pass  # the counts stay, for ``windows``

    def windows(self, total: int) -> list[tuple[float, float]]:
        return [sample_window(row.histogram(), row.k, total) for row in self.rows]


class _WindowPass(Pass):
    """Both thresholds and the majority sign in one pass, when each k-th lies in its window."""

    elementwise = True

    def __init__(self, k: int, windows: list[tuple[float, float]], float64: bool) -> None:
        self.k, self.windows, self.float64 = k, windows, float64
        self.below = [0, 0]
        self.total = 0
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []  # the columns that wait
        self.kept = 0  # entries held in pairs, against MAX_CANDIDATES
        self.failed = False
        self._lock = threading.Lock()
        self._local = threading.local()

    def update(self, info: TensorInfo, delta: Tensor, state: State, ctx: FoldContext) -> None:
        old, new = state["value"].reshape(-1).numpy(), delta.reshape(-1).numpy()
        for a in range(0, old.size, BLOCK):  # bounded scratch, however large the tensor
            self.update_chunk(info, new[a : a + BLOCK], {"value": old[a : a + BLOCK]}, ctx, a)

    def update_chunk(
        self, info: TensorInfo, delta: np.ndarray, state: Arrays, ctx: FoldContext, start: int
    ) -> None:
        old = state["value"]
        if self.failed:
            return
        if (old.dtype == np.float64) != self.float64:
            self.failed = True  # float32 tensors of a float64 model: the radix passes
            return
        kind = old.dtype.type
        pairs = self._scratch(old.size, old.dtype)
        windows = tuple(kind(x) for window in self.windows for x in window)
        below_old, below_delta, waiting, total = _window_chunk(
            old, delta, windows, kind(0), kind(1), *pairs
        )
        with self._lock:
            self.below[0] += below_old
            self.below[1] += below_delta
            self.total += total
            self.kept += 2 * waiting
            if self.kept > MAX_CANDIDATES:
                self.failed = True
                return
            self.pairs.append((pairs[0][:waiting].copy(), pairs[1][:waiting].copy()))

    def _scratch(self, n: int, dtype: np.dtype) -> list[np.ndarray]:
        buffers = getattr(self._local, "buffers", None)
        if buffers is None or buffers[0].size < n or buffers[0].dtype != dtype:
            buffers = self._local.buffers = [np.empty(n, dtype) for _ in range(2)]
        return buffers

    def finish(self, ctx: FoldContext) -> None:
        if self.failed:
            return  # the caller's radix passes take over
        columns = [np.concatenate([p[row] for p in self.pairs]) for row in (0, 1)]
        thresholds = []
        for values, (lo, hi), below in zip(columns, self.windows, self.below):
            magnitude = np.abs(values)
            inside = magnitude[(magnitude >= lo) & (magnitude <= hi)]
            thresholds.append(kth_in_window(self.k, below, inside))
        if None in thresholds:
            return
        a, b = columns
        t_old, t_delta = (a.dtype.type(t) for t in thresholds)
        s = a * (np.abs(a) >= t_old) + b * (np.abs(b) >= t_delta)
        total = self.total + int(np.count_nonzero(s > 0)) - int(np.count_nonzero(s < 0))
        ctx.stats["thresholds"] = tuple(thresholds)
        ctx.stats["majority_sign"] = float(np.sign(total))


class _MajoritySignPass(Pass):
    """Sign of the sum of elected signs over the whole model, for positions that sum to zero."""

    elementwise = True

    def __init__(self) -> None:
        self.total = 0
        self._lock = threading.Lock()

    def update(self, info: TensorInfo, delta: Tensor, state: State, ctx: FoldContext) -> None:
        self._add(state["value"].reshape(-1).numpy(), delta.reshape(-1).numpy(), ctx)

    def update_chunk(
        self, info: TensorInfo, delta: np.ndarray, state: Arrays, ctx: FoldContext, start: int
    ) -> None:
        self._add(state["value"], delta, ctx)

    def _add(self, old: np.ndarray, delta: np.ndarray, ctx: FoldContext) -> None:
        t_merged, t_delta = (old.dtype.type(t) for t in ctx.stats["thresholds"])
        part = int(_sign_sum(old, delta, t_merged, t_delta, old.dtype.type(0), old.dtype.type(1)))
        with self._lock:  # integers: the total is exact in any order
            self.total += part

    def finish(self, ctx: FoldContext) -> None:
        ctx.stats["majority_sign"] = float(np.sign(self.total))
