"""Compiled elementwise loops (numba) for the per-chunk work of a fold.

A fold that chains torch operations over a chunk makes one pass over memory per operation and
allocates a temporary for each; torch's CPU ``where`` is also not vectorised. One compiled loop
reads each input once and writes each output once, at memory speed, and releases the GIL so
chunks are folded on several cores. ``kernel`` is the one place the compile options live;
strategies use it for their own loops (see ``strategies/magmax.py``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

if "numba" not in sys.modules and "NUMBA_CACHE_DIR" not in os.environ:
    # compiled loops are cached in the user's cache, not beside the installed package, where
    # files no installer recorded would outlive ``pip uninstall`` (and turn the package into a
    # namespace package that shadows a later editable install)
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    os.environ["NUMBA_CACHE_DIR"] = str(cache_home / "contmerge" / "numba")

import numba  # noqa: E402  (reads NUMBA_CACHE_DIR when imported)
import numpy as np  # noqa: E402

F = TypeVar("F", bound=Callable[..., Any])


def kernel(func: F | None = None, **options: Any) -> Any:
    """``numba.njit`` without the GIL, cached on disk: ``@kernel`` or ``@kernel(fastmath=...)``."""

    def compile_(f: F) -> F:
        try:
            return numba.njit(nogil=True, cache=True, **options)(f)  # type: ignore[no-any-return]
        except RuntimeError:  # defined where numba cannot cache (a notebook, ``exec``)
            return numba.njit(nogil=True, **options)(f)  # type: ignore[no-any-return]

    return compile_(func) if func is not None else compile_


# Only sums may be reordered and fused (so they vectorise); each δ is one exact subtraction,
# and NaN/Inf still propagate (no "nnan"/"ninf" flags).
SUM_FLAGS = {"reassoc", "contract"}


@kernel(fastmath=SUM_FLAGS)
def subtract_sum_sq(x: np.ndarray, base: np.ndarray, out: np.ndarray) -> float:
    """out = x − base; returns Σ out² in float64 (NaN or Inf if any entry is)."""
    total = 0.0
    for i in range(x.size):
        d = x[i] - base[i]
        out[i] = d
        wide = np.float64(d)
        total += wide * wide
    return total


@kernel(fastmath=SUM_FLAGS)
def sum_sq(x: np.ndarray) -> float:
    """Σ x² in float64 (NaN or Inf if any entry is)."""
    total = 0.0
    for i in range(x.size):
        wide = np.float64(x[i])
        total += wide * wide
    return total
