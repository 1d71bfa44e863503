"""Exact k-th smallest magnitude over a whole model, streamed tensor by tensor.

Non-negative IEEE floats sort like their bit patterns, so a radix select on 16-bit digits finds
the exact k-th smallest |x| with one sweep per digit (2 for float32, 4 for float64) and a
65,536-bin histogram of memory, however large the model. Global top-k trims (TIES over the
whole flattened model, as in the authors' code) need this to stay in constant memory.

The histogram is a compiled loop over the bits (no temporaries), and ``update`` may be called
from several threads at once on pieces of the model: each thread counts into its own
histogram, summed by ``next_digit`` (counts add up exactly in any order).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .kernels import kernel

DIGIT_BITS = 16
BINS = 1 << DIGIT_BITS


@kernel
def _count_digit(
    bits: np.ndarray, hist: np.ndarray, shift: np.uint64, higher: np.uint64, prefix: np.uint64
) -> None:
    """hist[digit at ``shift``] += 1 for each |x| whose digits above ``higher`` are ``prefix``
    (``bits`` is the array's unsigned view; its sign bit is dropped here). All in uint64:
    numba turns uint64 mixed with signed integers into floats."""
    magnitude = (np.uint64(1) << np.uint64(bits.itemsize * 8 - 1)) - np.uint64(1)
    low = np.uint64(BINS - 1)
    for i in range(bits.size):
        b = np.uint64(bits[i]) & magnitude
        if (b >> higher) == prefix:
            hist[(b >> shift) & low] += 1


class KthSmallestAbs:
    """Feed every tensor once per digit: ``update`` for each, then ``next_digit``."""

    def __init__(self, k: int, float64: bool = False) -> None:
        if k < 1:
            raise ValueError("k counts from 1")
        self.k = k
        self.float_dtype = torch.float64 if float64 else torch.float32
        self.int_dtype = torch.int64 if float64 else torch.int32
        self.total_bits = 64 if float64 else 32
        self.digits = self.total_bits // DIGIT_BITS
        self.level = 0
        self.prefix = 0
        self._local = threading.local()
        self._hists: list[np.ndarray] = []  # one per thread that counted in this digit
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self.level == self.digits

    def update(self, values: torch.Tensor) -> None:
        flat = values.detach().reshape(-1)
        if flat.dtype != self.float_dtype:
            flat = flat.to(self.float_dtype)  # a float32 tensor of a model with float64 ones
        self.update_array(flat.cpu().numpy())

    def update_array(self, values: np.ndarray) -> None:
        """``update`` for a flat numpy array (any thread)."""
        if values.dtype.itemsize * 8 != self.total_bits:
            values = values.astype(np.float64 if self.total_bits == 64 else np.float32)
        unsigned = np.uint64 if self.total_bits == 64 else np.uint32
        shift = self.total_bits - DIGIT_BITS * (self.level + 1)
        # the digits already fixed; at the first digit none (a magnitude shifted right by 63
        # is 0, the empty prefix: shifting a uint64 by 64 is undefined)
        higher = min(self.total_bits - DIGIT_BITS * self.level, 63)
        _count_digit(
            values.view(unsigned),
            self._histogram(),
            np.uint64(shift),
            np.uint64(higher),
            np.uint64(self.prefix),
        )

    def _histogram(self) -> np.ndarray:
        hist = getattr(self._local, "hist", None)
        if hist is None or getattr(self._local, "level", -1) != self.level:
            hist = np.zeros(BINS, dtype=np.int64)
            self._local.hist, self._local.level = hist, self.level
            with self._lock:
                self._hists.append(hist)
        return hist

    def histogram(self) -> np.ndarray:
        """The counts of the current digit so far, over every thread."""
        return np.sum(self._hists, axis=0) if self._hists else np.zeros(BINS, dtype=np.int64)

    def next_digit(self) -> None:
        cumulative = np.cumsum(self.histogram())
        if int(cumulative[-1]) < self.k:
            raise ValueError(f"asked for the {self.k}-th value of {int(cumulative[-1])}")
        digit = int(np.searchsorted(cumulative, self.k))
        if digit:
            self.k -= int(cumulative[digit - 1])
        self.prefix = (self.prefix << DIGIT_BITS) | digit
        self.level += 1
        self._hists = []

    @property
    def value(self) -> float:
        if not self.done:
            raise RuntimeError("k-th value asked for before every digit was resolved")
        bits = torch.tensor([self.prefix], dtype=torch.int64).to(self.int_dtype)
        return float(bits.view(self.float_dtype)[0])


# --- one exact pass instead of one per digit -----------------------------------------------
#
# A look at a sample of the model (a prefix of every chunk) bounds where the k-th smallest |x|
# lies: a window [lo, hi] of magnitudes. One pass then counts the entries below the window and
# keeps the few inside it; when k falls among those, the k-th is picked from them exactly, and
# the radix passes are not needed. Otherwise (a sample unlike the rest) the caller falls back.

#: how many standard deviations of the sample's rank error the window spans on each side
WINDOW_SIGMAS = 6.0
#: entries kept inside windows (over every row and thread) before the caller must fall back
MAX_CANDIDATES = 16 << 20


def sample_window(hist: np.ndarray, k: int, total: int) -> tuple[float, float]:
    """Magnitudes [lo, hi] likely to hold the k-th smallest of ``total`` values, from the
    first-digit histogram (float32 bits) of a sample of them."""
    seen = int(hist.sum())
    if seen == 0:
        return 0.0, float("inf")
    share = k / total
    rank = share * seen
    spread = WINDOW_SIGMAS * float(np.sqrt(seen * share * (1 - share))) + 64
    cumulative = np.cumsum(hist)
    lower_bin = int(np.searchsorted(cumulative, max(rank - spread, 0), side="left"))
    upper_bin = int(np.searchsorted(cumulative, rank + spread, side="left"))
    if rank - spread <= 0:
        lo = 0.0
    else:
        lo = float(np.array([lower_bin << DIGIT_BITS], dtype=np.uint32).view(np.float32)[0])
    if rank + spread >= seen or upper_bin >= BINS - 1:
        return lo, float("inf")
    top = ((upper_bin + 1) << DIGIT_BITS) - 1
    return lo, float(np.array([top], dtype=np.uint32).view(np.float32)[0])


def kth_in_window(k: int, below: int, inside: np.ndarray) -> float | None:
    """The k-th smallest magnitude, given how many lie below a window and the magnitudes
    inside it; None when the k-th is not inside (the window missed)."""
    if not below < k <= below + inside.size:
        return None
    return float(np.partition(inside, k - below - 1)[k - below - 1])
