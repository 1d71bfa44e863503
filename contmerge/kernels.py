"""Compiled elementwise loops (numba) for the per-chunk work of a fold.

A fold that chains torch operations over a chunk makes one pass over memory per operation and
allocates a temporary for each; torch's CPU ``where`` is also not vectorised. One compiled loop
reads each input once and writes each output once, at memory speed, and releases the GIL so
chunks are folded on several cores. ``kernel`` is the one place the compile options live;
strategies use it for their per-entry functions (see ``strategies/magmax.py``), which the loops
here are built around: ``fused_fold`` makes one loop of reading an arrival's entries,
differencing them against the base, summing δ² for the checks, a pre-processor and the rule
(whose results it probes for Inf/NaN in the same sum: a fold may overflow from finite inputs).
"""

from __future__ import annotations

import functools
import os
import platform
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
from llvmlite import ir  # noqa: E402
from numba import types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

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
def add_square(total: float, value: Any) -> float:
    """total + value² in float64. Its flags travel with it when inlined, so a loop summing with
    it vectorises while the loop's own arithmetic stays exact (no fused multiply-adds)."""
    wide = np.float64(value)
    return total + wide * wide


@kernel(fastmath=SUM_FLAGS)
def add_probe(total: float, value: Any) -> float:
    """total + 0 for a finite value, NaN for Inf or NaN (0·Inf is NaN): folded into a sum, it
    makes the sum non-finite if any value is, for one multiply-add per entry (no "nnan"/"nsz"
    flags, so ``value * 0`` is never simplified away)."""
    return total + np.float64(value) * 0.0


@kernel
def all_finite(x: np.ndarray) -> bool:
    """Whether every entry of ``x`` is finite: probed a block at a time (vectorised), stopping
    at the first block that is not."""
    block = 1024
    for start in range(0, x.size, block):
        probe = 0.0
        for i in range(start, min(start + block, x.size)):
            probe = add_probe(probe, x[i])
        if probe != 0.0:  # NaN
            return False
    return True


@kernel
def subtract_sum_sq(x: np.ndarray, base: np.ndarray, out: np.ndarray) -> float:
    """out = x − base; returns Σ out² in float64 (NaN or Inf if any entry is)."""
    total = 0.0
    for i in range(x.size):
        d = x[i] - base[i]
        out[i] = d
        total = add_square(total, d)
    return total


@kernel
def sum_sq(x: np.ndarray) -> float:
    """Σ x² in float64 (NaN or Inf if any entry is)."""
    total = 0.0
    for i in range(x.size):
        total = add_square(total, x[i])
    return total


@kernel
def keep_delta(delta: Any, position: np.uint64, params: tuple[()]) -> Any:
    """The identity transform (no pre-processor)."""
    return delta


#: streaming stores need whole vectors at aligned addresses: the loops store normally up to the
#: first multiple of this many bytes, and stream from there on
STREAM_ALIGN = 64
#: x86-64 only (its fence is ``sfence``); elsewhere the stores are plain
STREAMING = platform.machine().lower() in ("x86_64", "amd64")


@intrinsic
def _store_streaming(typingctx: Any, array: Any, index: Any, value: Any) -> Any:
    """``array[index] = value`` as a non-temporal store: the line goes to memory without first
    being read into the cache. A fold writes a new state far larger than the cache; a normal
    store reads each line before overwriting it, one more pass over memory of the state's size.
    Only for indices from an aligned start on (``STREAM_ALIGN``), and followed by ``_fence``."""
    sig = types.void(array, index, array.dtype)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        kind = signature.args[0]
        view = context.make_array(kind)(context, builder, args[0])
        where = cgutils.get_item_pointer(
            context, builder, kind, view, [args[1]], wraparound=False, boundscheck=False
        )
        # the vectoriser widens this to aligned vector stores (every vector of an aligned run
        # of entries starts on its own size); scalar ones have no alignment to keep
        store = builder.store(args[2], where, align=STREAM_ALIGN if STREAMING else None)
        if STREAMING:
            store.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _fence(typingctx: Any) -> Any:
    """Order the streaming stores before anything after (another thread reads the state)."""
    sig = types.void()

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        if STREAMING:
            kind = ir.FunctionType(ir.VoidType(), [])
            sfence = cgutils.get_or_insert_function(builder.module, kind, "llvm.x86.sse.sfence")
            builder.call(sfence, [])
        return context.get_dummy_value()

    return sig, codegen


@kernel
def _store(array: np.ndarray, index: int, value: Any) -> None:
    array[index] = value


@kernel
def _plain_head(out: np.ndarray, size: int) -> int:
    """How many of the first ``size`` entries of ``out`` are stored plainly, so the streaming
    stores after them start on ``STREAM_ALIGN``: all of them when entries off their natural
    alignment never line up."""
    head = min(size, (-out.ctypes.data % STREAM_ALIGN) // out.itemsize)
    if (out.ctypes.data + head * out.itemsize) % STREAM_ALIGN:
        head = size
    return head


# The loops below are built per per-entry function, so that function is inlined into them (a
# function passed as an argument is called, not inlined, and the loop runs ~8 % slower). numba
# cannot cache closures on disk (their key changes every process), so each is compiled once per
# process, in about half a second, on first use.


def _fold_entries(
    transform: Callable[..., Any], update: Callable[..., Any], store: Callable[..., None]
) -> Callable[..., float]:
    @numba.njit(nogil=True)
    def loop(transform_params, params, start, x, base, old, out):  # type: ignore[no-untyped-def]
        total = 0.0
        for i in range(x.size):
            delta = x[i] - base[i]
            total = add_square(total, delta)  # of θ_t − θ0, before any pre-processor
            delta = transform(delta, start + np.uint64(i), transform_params)
            new = update(delta, old[i], params)
            store(out, i, new)
            total = add_probe(total, new)  # a new state overflowing from finite inputs
        return total

    return loop  # type: ignore[no-any-return]


@functools.cache
def fused_fold(transform: Callable[..., Any], update: Callable[..., Any]) -> Callable[..., float]:
    """``loop(transform_params, params, start, x, base, old, out) -> Σ (x − base)²``: one pass
    writing ``out[i] = update(transform(x[i] − base[i], start + i, transform_params), old[i],
    params)``; the sum is NaN or Inf if any δ is, or any ``out[i]`` (``add_probe``)."""
    stored = _fold_entries(transform, update, _store)
    streamed = _fold_entries(transform, update, _store_streaming)

    @numba.njit(nogil=True)
    def loop(transform_params, params, start, x, base, old, out):  # type: ignore[no-untyped-def]
        head = _plain_head(out, x.size)
        total = stored(
            transform_params, params, start, x[:head], base[:head], old[:head], out[:head]
        )
        total += streamed(
            transform_params,
            params,
            start + np.uint64(head),
            x[head:],
            base[head:],
            old[head:],
            out[head:],
        )
        _fence()
        return total

    return loop  # type: ignore[no-any-return]


@functools.cache
def update_loop(update: Callable[..., Any]) -> Callable[..., None]:
    """``loop(params, delta, old, out)``: ``out[i] = update(delta[i], old[i], params)``."""

    @numba.njit(nogil=True)
    def loop(params, delta, old, out):  # type: ignore[no-untyped-def]
        for i in range(delta.size):
            out[i] = update(delta[i], old[i], params)

    return loop  # type: ignore[no-any-return]


@functools.cache
def transform_loop(transform: Callable[..., Any]) -> Callable[..., None]:
    """``loop(params, start, delta)``: ``delta[i] = transform(delta[i], start + i, params)``."""

    @numba.njit(nogil=True)
    def loop(params, start, delta):  # type: ignore[no-untyped-def]
        for i in range(delta.size):
            delta[i] = transform(delta[i], start + np.uint64(i), params)

    return loop  # type: ignore[no-any-return]


def _marked_entries(update: Callable[..., Any], store: Callable[..., None]) -> Callable[..., float]:
    @numba.njit(nogil=True)
    def loop(params, x, base, old, out, marks):  # type: ignore[no-untyped-def]
        total = 0.0
        for i in range(x.size):
            delta = x[i] - base[i]
            total = add_square(total, delta)
            new, mark = update(delta, old[i], params)
            store(out, i, new)
            marks[i] = mark
            total = add_probe(total, new)
        return total

    return loop  # type: ignore[no-any-return]


@functools.cache
def marked_fold(update: Callable[..., Any]) -> Callable[..., float]:
    """``loop(params, x, base, old, out, marks) -> Σ (x − base)²``: ``fused_fold`` for a rule
    that cannot decide every entry in one pass. ``update(δ, old, params) -> (new, mark)``; each
    entry's ``mark`` (uint8) goes to ``marks[i]``, for the rule to find the ones that wait (it
    says what the bits mean). The sum is NaN or Inf if any δ or any ``out[i]`` is."""
    stored = _marked_entries(update, _store)
    streamed = _marked_entries(update, _store_streaming)

    @numba.njit(nogil=True)
    def loop(params, x, base, old, out, marks):  # type: ignore[no-untyped-def]
        head = _plain_head(out, x.size)
        total = stored(params, x[:head], base[:head], old[:head], out[:head], marks[:head])
        total += streamed(params, x[head:], base[head:], old[head:], out[head:], marks[head:])
        _fence()
        return total

    return loop  # type: ignore[no-any-return]
