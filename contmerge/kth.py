"""Exact k-th smallest magnitude over a whole model, streamed tensor by tensor.

Non-negative IEEE floats sort like their bit patterns, so a radix select on 16-bit digits finds
the exact k-th smallest |x| with one sweep per digit (2 for float32, 4 for float64) and a
65,536-bin histogram of memory, however large the model. Global top-k trims (TIES over the
whole flattened model, as in the authors' code) need this to stay in constant memory.
"""

from __future__ import annotations

import torch

DIGIT_BITS = 16
BINS = 1 << DIGIT_BITS


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
        self._hist = torch.zeros(BINS, dtype=torch.int64)

    @property
    def done(self) -> bool:
        return self.level == self.digits

    def update(self, values: torch.Tensor) -> None:
        bits = values.detach().to(self.float_dtype).abs().reshape(-1).view(self.int_dtype)
        bits = bits.to(torch.int64)
        if self.level:
            # only the entries whose higher digits match the ones already fixed
            higher = self.total_bits - DIGIT_BITS * self.level
            bits = bits[(bits >> higher) == self.prefix]
        shift = self.total_bits - DIGIT_BITS * (self.level + 1)
        digit = (bits >> shift) & (BINS - 1)
        self._hist += torch.bincount(digit, minlength=BINS)

    def next_digit(self) -> None:
        cumulative = torch.cumsum(self._hist, 0)
        if int(cumulative[-1]) < self.k:
            raise ValueError(f"asked for the {self.k}-th value of {int(cumulative[-1])}")
        digit = int(torch.searchsorted(cumulative, self.k))
        if digit:
            self.k -= int(cumulative[digit - 1])
        self.prefix = (self.prefix << DIGIT_BITS) | digit
        self.level += 1
        self._hist.zero_()

    @property
    def value(self) -> float:
        if not self.done:
            raise RuntimeError("k-th value asked for before every digit was resolved")
        bits = torch.tensor([self.prefix], dtype=torch.int64).to(self.int_dtype)
        return float(bits.view(self.float_dtype)[0])
