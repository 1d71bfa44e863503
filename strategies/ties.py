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

With the state in memory the fold does not wait for the thresholds (``deferred_fold``): a look
at a sample bounds each threshold by a window of magnitudes, and an entry outside its window
is kept or trimmed whatever the exact threshold. So one pass folds every column whose two
entries are outside their windows (and whose elected sign does not hang on the majority),
counts what the thresholds need, and keeps the ~1 % of columns that wait; the exact
thresholds and majority sign come from those, and then those columns are folded in place.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from contmerge.kernels import add_probe, kernel, marked_fold
from contmerge.kth import MAX_CANDIDATES, KthSmallestAbs, kth_in_window, sample_window
from contmerge.strategy import (
    Arrays,
    ChunkFold,
    DeferredFold,
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
    defers = True
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
        windows = sample.windows(d)
        # the rest is settled by ``deferred_fold``, unless the columns that would wait for it
        # are too many to keep (a large model): then it would only fold again
        if ctx.defer and not ctx.float64 and sample.waiting(windows, d) <= MAX_CANDIDATES:
            ctx.stats["windows"] = windows
            return
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

    def deferred_fold(self, ctx: FoldContext) -> DeferredFold | None:
        if ctx.index == 1 or "windows" not in ctx.stats:
            return None
        d = ctx.numel
        return _Deferred(self, d - int(d * self.threshold / 100), ctx.stats["windows"])

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
    return _ties_trimmed(a, b, old, lam, majority, mean, zero, one)


@kernel(error_model="numpy")
def _ties_trimmed(
    a: Any, b: Any, old: Any, lam: Any, majority: Any, mean: bool, zero: Any, one: Any
) -> Any:
    """The TIES step of one column whose entries ``a`` (merged) and ``b`` (δ) are trimmed."""
    total = a + b
    elected = one if total > zero else (-one if total < zero else majority)
    up, down = elected > zero, elected <= zero  # torch: where(sign > 0, row > 0, row < 0)
    kept_a = a * (one if (up & (a > zero)) | (down & (a < zero)) else zero)
    kept_b = b * (one if (up & (b > zero)) | (down & (b < zero)) else zero)
    combined = kept_a + kept_b
    count = (one if kept_a != zero else zero) + (one if kept_b != zero else zero)
    averaged = combined / (count if count > one else one)
    return old + lam * (averaged if mean else combined)


# Marks of ``_ties_decided``, one byte per column: which entries lie below their window,
# whether the column waits, and whether its trimmed sum is positive. A decided column's sum
# is 0 only when both entries are trimmed (cancelling ones wait), so the byte also tells a
# negative sum. Four bits: with a fifth (a "negative" bit) the loop no longer vectorised, and
# ran 5x slower (measured).
BELOW_MERGED, BELOW_DELTA, WAITS, POSITIVE = 1, 2, 4, 8
_u8 = np.uint8


@kernel(error_model="numpy")
def _ties_decided(delta: Any, old: Any, params: tuple[Any, ...]) -> tuple[Any, np.uint8]:
    """(new value, mark) of a column whose thresholds are known only to lie in windows
    [lo, hi]: an entry above its window is kept, one below it trimmed, as by any threshold
    inside (so the product is the reference's, bit for bit). The column waits, its old value
    written for now, if an entry is inside its window, or if its trimmed entries cancel to 0
    but are not both 0 (then the elected sign is the majority's, known only at the end)."""
    lam, lo_merged, hi_merged, lo_delta, hi_delta, mean, zero, one = params
    ma, mb = abs(old), abs(delta)
    a = old * (one if ma > hi_merged else zero)
    b = delta * (one if mb > hi_delta else zero)
    total = a + b
    waits = ((ma >= lo_merged) & (ma <= hi_merged)) | ((mb >= lo_delta) & (mb <= hi_delta))
    waits = waits | ((total == zero) & ((a != zero) | (b != zero)))
    new = _ties_trimmed(a, b, old, lam, one, mean, zero, one)  # both 0: any majority will do
    mark = (
        _u8(ma < lo_merged)
        | (_u8(mb < lo_delta) << _u8(1))
        | (_u8(waits) << _u8(2))
        | (_u8(total > zero) << _u8(3))
    )
    return (old if waits else new), mark


#: a 1 in every byte of a uint64: eight marks are counted at once, each byte its own counter
_BYTES = np.uint64(0x0101010101010101)


@kernel
def _tally(
    marks: np.ndarray,
    words: np.ndarray,
    x: np.ndarray,
    base: np.ndarray,
    old: np.ndarray,
    positions: np.ndarray,
    merged: np.ndarray,
    delta: np.ndarray,
) -> tuple[int, int, int, int, int]:
    """A chunk's marks counted (entries below each window; decided columns of positive and of
    negative sum) and its waiting columns gathered: positions, merged and δ values (δ
    differenced as the fold did). ``words`` is ``marks``' whole uint64s: eight bytes are
    counted at once, a counter per byte emptied every 255 words (10x faster than a loop over
    the bytes, measured), and only words holding a waiting column are looked into."""
    one, two, three, eight = np.uint64(1), np.uint64(2), np.uint64(3), np.uint64(8)
    ones, low = _BYTES, np.uint64(255)
    below_merged = below_delta = positive = negative = np.uint64(0)
    for start in range(0, words.size, 255):
        b_merged = b_delta = pos = neg = np.uint64(0)
        for j in range(start, min(start + 255, words.size)):
            w = words[j]
            b_merged += w & ones
            b_delta += (w >> one) & ones
            pos += (w >> three) & ~(w >> two) & ones  # decided, sum > 0
            # decided, sum ≤ 0 and not both trimmed: sum < 0
            neg += ~((w >> two) | (w >> three) | (w & (w >> one))) & ones
        for _ in range(8):
            below_merged += b_merged & low
            below_delta += b_delta & low
            positive += pos & low
            negative += neg & low
            b_merged, b_delta = b_merged >> eight, b_delta >> eight
            pos, neg = pos >> eight, neg >> eight
    for i in range(words.size * 8, marks.size):  # the last few bytes
        m = np.uint64(marks[i])
        below_merged += m & one
        below_delta += (m >> one) & one
        positive += (m >> three) & ~(m >> two) & one
        negative += ~((m >> two) | (m >> three) | (m & (m >> one))) & one
    waiting = 0
    for j in range(words.size + 1):
        if j < words.size and ((words[j] >> two) & ones) == 0:
            continue  # no waiting column among these eight
        for i in range(j * 8, min(j * 8 + 8, marks.size)):
            if marks[i] & WAITS:
                positions[waiting] = i
                merged[waiting] = old[i]
                delta[waiting] = x[i] - base[i]
                waiting += 1
    return below_merged, below_delta, positive, negative, waiting


@kernel(error_model="numpy")
def _settle_columns(
    out: np.ndarray,
    positions: np.ndarray,
    merged: np.ndarray,
    delta: np.ndarray,
    params: tuple[Any, ...],
) -> float:
    """The waiting columns folded with the exact thresholds, into their places in ``out``;
    0 if every new value is finite, else NaN."""
    probe = 0.0
    for j in range(positions.size):
        new = _ties_entry(delta[j], merged[j], params)
        out[positions[j]] = new
        probe = add_probe(probe, new)
    return probe


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

    def waiting(self, windows: list[tuple[float, float]], total: int) -> float:
        """About how many entries inside the windows a fold of ``total`` columns would keep
        (two per column with an entry inside), from the share of the sample inside them."""
        share = 0.0
        for row, (lo, hi) in zip(self.rows, windows):
            hist = row.histogram()
            bins = np.array([lo, min(hi, np.finfo(np.float32).max)], np.float32)
            first, last = (bins.view(np.uint32) >> 16).tolist()
            share += float(hist[first : last + 1].sum()) / max(float(hist.sum()), 1.0)
        return 2 * share * total


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


@dataclass
class _Waiting:
    """One chunk's waiting columns."""

    name: str
    out: np.ndarray  # the chunk's new state
    positions: np.ndarray  # in the chunk
    merged: np.ndarray
    delta: np.ndarray


class _Deferred(DeferredFold):
    """The fold of one arrival that starts before its thresholds are known (see the module)."""

    def __init__(self, rule: ContinualTies, k: int, windows: list[tuple[float, float]]) -> None:
        self.rule, self.k, self.windows = rule, k, windows
        self.below = [0, 0]  # entries below each row's window
        self.signs = 0  # Σ elected sign over the decided columns
        self.waiting: list[_Waiting] = []
        self.kept = 0  # entries held in ``waiting``, against MAX_CANDIDATES
        self.failed = False
        self._lock = threading.Lock()
        self._local = threading.local()

    def chunk(self, info: TensorInfo) -> ChunkFold:
        (lo_merged, hi_merged), (lo_delta, hi_delta) = self.windows
        s = info.scalar
        params = (
            s(self.rule.scaling_factor),
            *(s(x) for x in (lo_merged, hi_merged, lo_delta, hi_delta)),
            self.rule.merge_func == "mean",
            s(0.0),
            s(1.0),
        )
        loop = marked_fold(_ties_decided)

        def fold(start: int, x: np.ndarray, base: np.ndarray, old: np.ndarray, out: np.ndarray):
            if self.failed:
                return 0.0  # folded again the ordinary way
            marks, positions, merged, delta = (b[: x.size] for b in self._scratch(x.size, x.dtype))
            sq = loop(params, x, base, old, out, marks)
            words = marks[: x.size // 8 * 8].view(np.uint64)
            below_merged, below_delta, positive, negative, n = _tally(
                marks, words, x, base, old, positions, merged, delta
            )
            waiting = _Waiting(
                info.name, out, positions[:n].copy(), merged[:n].copy(), delta[:n].copy()
            )
            with self._lock:
                self.below[0] += int(below_merged)
                self.below[1] += int(below_delta)
                self.signs += int(positive) - int(negative)
                self.kept += 2 * n
                if self.kept > MAX_CANDIDATES:
                    self.failed, self.waiting = True, []
                else:
                    self.waiting.append(waiting)
            return float(sq)

        return fold

    def _scratch(self, n: int, dtype: np.dtype) -> tuple[np.ndarray, ...]:
        buffers = getattr(self._local, "buffers", None)
        if buffers is None or buffers[0].size < n or buffers[2].dtype != dtype:
            buffers = (np.empty(n, np.uint8), np.empty(n, np.int32))
            buffers += (np.empty(n, dtype), np.empty(n, dtype))
            self._local.buffers = buffers
        return buffers

    def settle(self, ctx: FoldContext) -> list[str] | None:
        if self.failed:
            return None
        rows = [np.concatenate([w.merged for w in self.waiting]) if self.waiting else None]
        rows.append(np.concatenate([w.delta for w in self.waiting]) if self.waiting else None)
        thresholds = []
        for values, (lo, hi), below in zip(rows, self.windows, self.below):
            magnitude = np.abs(values) if values is not None else np.empty(0, np.float32)
            inside = magnitude[(magnitude >= lo) & (magnitude <= hi)]
            thresholds.append(kth_in_window(self.k, below, inside))
        if None in thresholds:
            return None
        t_merged, t_delta = thresholds
        total = self.signs
        if self.waiting:
            a, b = rows
            kind = a.dtype.type
            with np.errstate(over="ignore"):  # a sum of two huge entries is ±inf: its sign
                s = a * (np.abs(a) >= kind(t_merged)) + b * (np.abs(b) >= kind(t_delta))
            total += int(np.count_nonzero(s > 0)) - int(np.count_nonzero(s < 0))
        majority = float(np.sign(total))
        ctx.stats["thresholds"] = (t_merged, t_delta)
        ctx.stats["majority_sign"] = majority
        overflowed = []
        for w in self.waiting:
            kind = w.out.dtype.type
            params = (
                kind(self.rule.scaling_factor),
                kind(t_merged),
                kind(t_delta),
                kind(majority),
                self.rule.merge_func == "mean",
                kind(0.0),
                kind(1.0),
            )
            if _settle_columns(w.out, w.positions, w.merged, w.delta, params) != 0.0:
                overflowed.append(w.name)
        return overflowed


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
