"""The fast path of elementwise rules: tensors folded 1 MiB at a time, on several threads.

Tensors are gathered into batches of about ``BATCH_BYTES`` of arrival, so the threads hand work
over once per batch rather than once per tensor (a model's many small tensors would otherwise
cost more in hand-overs than in folding). The batch is cut into chunks that the threads take in
turn; each chunk is read into a buffer that stays in cache and hashed there. A rule with an
``entry_fold`` then makes one pass over memory: a loop compiled around it differences the chunk
against the base, sums δ² for the checks and folds (``kernels.fused_fold``). Other rules get δ
in a scratch buffer and fold it with ``fold_into``.

A chunk costs a few Python calls (read, hash, loop) around work that releases the GIL, and
everything else about its tensor is worked out once per tensor in ``add``: with two threads,
Python between the loops is what keeps them from memory speed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .buffers import numpy_dtype
from .chunks import ChunkRunner
from .errors import StrategyError
from .fold_plan import FoldPath
from .hashing import LEAF_BYTES, leaf_digest
from .kernels import all_finite, fused_fold, keep_delta, subtract_sum_sq
from .sources import ChunkReader
from .strategy import (
    Arrays,
    ChunkFold,
    DeferredFold,
    EntryFold,
    FoldContext,
    Pass,
    State,
    Strategy,
    TensorInfo,
)

#: arrival bytes per chunk: whole hash leaves, in cache between the read, the hash and the fold
#: (1 to 4 MiB measured within a few % of each other; 1 MiB a little ahead)
CHUNK_BYTES = LEAF_BYTES
#: arrival bytes gathered before the threads are set to work (a durable state holds the batch's
#: new state in memory until it is written)
BATCH_BYTES = 64 << 20


def flat_base(info: TensorInfo, base: torch.Tensor) -> tuple[torch.Tensor, np.ndarray | None]:
    """The base's tensor as ``ElementwiseBatch.add`` takes it (half precision is widened per
    chunk, so it has no numpy view)."""
    flat = base.reshape(-1)
    return flat, flat.numpy() if info.meta.dtype == info.compute_dtype else None


@dataclass(slots=True)
class _Fused:
    """A rule's ``entry_fold`` as its compiled loop and arguments (single-slot state)."""

    loop: Callable[..., float]
    transform_params: tuple[Any, ...]
    params: tuple[Any, ...]
    old: np.ndarray
    out: np.ndarray
    #: a ``DeferredFold``'s fold of one chunk, called instead of ``loop``
    chunk: ChunkFold | None = None


@dataclass(slots=True)
class _Tensor:
    info: TensorInfo
    arrival_dtype: torch.dtype  # any float dtype the compute dtype holds (``contmerge.dtypes``)
    read: ChunkReader  # the arrival's bytes, chunk by chunk
    chunk: int  # entries per chunk
    base: torch.Tensor  # flat view, the base's dtype
    base_array: np.ndarray | None  # the same as numpy when it is already the compute dtype
    old: Arrays  # flat views of the current state (unfused rules)
    target: State  # the new state, as the store will keep it
    out: Arrays  # flat numpy views of ``target`` (unfused rules)
    fused: _Fused | None  # one loop for the whole chunk, when the rule has an ``entry_fold``


@dataclass(slots=True)
class Folded:
    """One tensor of a batch, folded: its hash leaves and ‖θ_t − θ0‖² (NaN/Inf if any δ or any
    entry of the new state is)."""

    info: TensorInfo
    target: State
    leaves: list[bytes]
    sum_sq: float


class _Gathered:
    """Tensors gathered for the fold threads (``tensors`` have ``info`` and ``chunk``)."""

    def __init__(self, runner: ChunkRunner, ctx: FoldContext) -> None:
        self.runner, self.ctx = runner, ctx
        self.tensors: list[Any] = []
        self.nbytes = 0

    @property
    def full(self) -> bool:
        return self.nbytes >= BATCH_BYTES

    def _items(self) -> list[tuple[int, int, int]]:
        """(tensor, start, stop) of every chunk: the work the threads take in turn."""
        return [
            (k, start, min(start + t.chunk, t.info.meta.numel))
            for k, t in enumerate(self.tensors)
            for start in range(0, t.info.meta.numel, t.chunk)
        ]


class ElementwiseBatch(_Gathered):
    """Tensors waiting to be folded together; ``run`` folds them all."""

    def __init__(self, strategy: Strategy, runner: ChunkRunner, ctx: FoldContext) -> None:
        super().__init__(runner, ctx)
        self.strategy = strategy

    def add(
        self,
        info: TensorInfo,
        arrival_dtype: torch.dtype,
        read: ChunkReader,
        base: tuple[torch.Tensor, np.ndarray | None],
        old: State,
        target: State,
        path: FoldPath,
        deferred: DeferredFold | None = None,
    ) -> None:
        """``read`` gives the arrival's entries in ``arrival_dtype``, which may differ from the
        base's; ``base`` is the base's tensor flattened, and the same as numpy when it is
        already in the compute dtype (see ``flat_base``). ``path`` is the tensor's
        ``fold_plan.plan``: ``FUSED`` or ``CHUNKED``; or ``DEFERRED``, folded by
        ``deferred``."""
        flat, base_array = base
        entry = self.strategy.entry_fold(info, self.ctx) if path is FoldPath.FUSED else None
        if path is FoldPath.DEFERRED:
            assert deferred is not None
            old_arrays = out_arrays = {}
            fused = self._fused(info, None, old, target, deferred.chunk(info))
        elif entry is None:
            old_arrays = {k: v.reshape(-1).numpy() for k, v in old.items()}
            out_arrays = {k: v.view(-1).numpy() for k, v in target.items()}
            fused = None
        else:  # the loop takes the one slot's arrays; nothing else needs them
            old_arrays = out_arrays = {}
            fused = self._fused(info, entry, old, target)
        self.tensors.append(
            _Tensor(
                info,
                arrival_dtype,
                read,
                # whole hash leaves of the arrival's own bytes, whatever the base's dtype
                CHUNK_BYTES // arrival_dtype.itemsize,
                flat,
                base_array,
                old_arrays,
                target,
                out_arrays,
                fused,
            )
        )
        self.nbytes += info.meta.numel * arrival_dtype.itemsize

    def _fused(
        self,
        info: TensorInfo,
        entry: EntryFold | None,
        old: State,
        target: State,
        chunk: ChunkFold | None = None,
    ) -> _Fused:
        if len(target) != 1:
            raise StrategyError(
                f"{self.strategy.spec()}: entry_fold needs a single state slot, "
                f"{info.name} has {sorted(target)}"
            )
        ((slot, out),) = target.items()
        old_array, out_array = old[slot].reshape(-1).numpy(), out.view(-1).numpy()
        if entry is None:
            assert chunk is not None
            return _Fused(_no_loop, (), (), old_array, out_array, chunk)
        before = entry.before
        return _Fused(
            fused_fold(keep_delta if before is None else before.transform, entry.update),
            () if before is None else before.params,
            entry.params,
            old_array,
            out_array,
        )

    def run(self) -> list[Folded]:
        """Fold every chunk of every tensor; results per tensor, in the order added."""
        items = self._items()
        with self.runner.exclusive_torch_threads():
            results = self.runner.map(items, self._fold_chunk)
        leaves: list[list[bytes]] = [[] for _ in self.tensors]
        sums: list[list[float]] = [[] for _ in self.tensors]
        for (k, _, _), (digests, part) in zip(items, results):
            leaves[k].extend(digests)
            sums[k].append(part)
        folded = [
            Folded(t.info, t.target, leaves[k], sum(sums[k], 0.0))
            for k, t in enumerate(self.tensors)
        ]
        self.tensors, self.nbytes = [], 0
        return folded

    def _fold_chunk(self, item: tuple[int, int, int]) -> tuple[list[bytes], float]:
        """Entries ``start:stop`` of tensor ``k``: their hash leaves and Σ δ² (NaN/Inf if the new
        state is). All per-chunk data stays in the thread's own buffers."""
        k, start, stop = item
        t = self.tensors[k]
        raw = t.read(start, stop, self.runner.scratch("arrival", CHUNK_BYTES))
        leaves = [leaf_digest(raw[i : i + LEAF_BYTES]) for i in range(0, raw.size, LEAF_BYTES)]
        arrival, base = _in_compute_dtype(
            self.runner,
            t.info.compute_dtype,
            t.arrival_dtype,
            raw,
            (t.base, t.base_array),
            start,
            stop,
        )
        fused = t.fused
        if fused is not None:
            old, out = fused.old[start:stop], fused.out[start:stop]
            if fused.chunk is not None:
                return leaves, fused.chunk(start, arrival, base, old, out)
            sq = fused.loop(
                fused.transform_params, fused.params, np.uint64(start), arrival, base, old, out
            )
            return leaves, sq
        delta = _buffer(self.runner, "delta", stop - start, t.info.compute_dtype)
        sq = subtract_sum_sq(arrival, base, delta)
        olds = {slot: v[start:stop] for slot, v in t.old.items()}
        outs = {slot: v[start:stop] for slot, v in t.out.items()}
        self.strategy.fold_into(t.info, outs, olds, delta, base, self.ctx, start)
        if not all(all_finite(new) for new in outs.values()):  # overflow from finite inputs
            sq = float("nan")
        return leaves, sq


def _no_loop(*args: Any) -> float:
    raise AssertionError("a deferred fold's chunks go to its own ``chunk``")


def _in_compute_dtype(
    runner: ChunkRunner,
    compute: torch.dtype,
    arrival_dtype: torch.dtype,
    raw: np.ndarray,
    base: tuple[torch.Tensor, np.ndarray | None],
    start: int,
    stop: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The chunk's arrival and base entries in the compute dtype: views where they already are,
    else widened (half precision, 8-bit floats) into this thread's buffers, in cache."""
    flat, base_array = base
    n = stop - start
    if arrival_dtype == compute:
        arrival = raw.view(numpy_dtype(compute))
    else:
        arrival = _buffer(runner, "wide arrival", n, compute)
        torch.from_numpy(arrival).copy_(torch.from_numpy(raw).view(arrival_dtype))
    if base_array is not None:
        return arrival, base_array[start:stop]
    wide_base = _buffer(runner, "wide base", n, compute)
    torch.from_numpy(wide_base).copy_(flat[start:stop])
    return arrival, wide_base


def _buffer(runner: ChunkRunner, key: str, numel: int, dtype: torch.dtype) -> np.ndarray:
    """This thread's scratch of ``numel`` entries of a numpy-compatible ``dtype``."""
    raw = runner.scratch(key, numel * dtype.itemsize)
    return raw.view(numpy_dtype(dtype))


@dataclass(slots=True)
class _Swept:
    info: TensorInfo
    arrival_dtype: torch.dtype
    read: ChunkReader
    chunk: int
    base: torch.Tensor
    base_array: np.ndarray | None
    state: Arrays  # flat views of the current state


class ElementwiseSweep(_Gathered):
    """A strategy's elementwise ``Pass`` over a batch of tensors, chunk by chunk on the fold
    threads: each chunk of the arrival is read and differenced in cache, then handed to
    ``Pass.update_chunk`` with the state's matching entries. Nothing is written."""

    def __init__(self, sweep: Pass, runner: ChunkRunner, ctx: FoldContext) -> None:
        super().__init__(runner, ctx)
        self.sweep = sweep

    def add(
        self,
        info: TensorInfo,
        arrival_dtype: torch.dtype,
        read: ChunkReader,
        base: tuple[torch.Tensor, np.ndarray | None],
        state: State,
    ) -> None:
        flat, base_array = base
        chunk = CHUNK_BYTES // arrival_dtype.itemsize
        views = {k: v.reshape(-1).numpy() for k, v in state.items()}
        self.tensors.append(_Swept(info, arrival_dtype, read, chunk, flat, base_array, views))
        self.nbytes += info.meta.numel * arrival_dtype.itemsize

    def run(self) -> list[str]:
        """Sweep every chunk; the names of the tensors swept (to release)."""
        with self.runner.exclusive_torch_threads():
            self.runner.map(self._items(), self._sweep_chunk)
        names = [t.info.name for t in self.tensors]
        self.tensors, self.nbytes = [], 0
        return names

    def _sweep_chunk(self, item: tuple[int, int, int]) -> None:
        k, start, stop = item
        t = self.tensors[k]
        raw = t.read(start, stop, self.runner.scratch("arrival", CHUNK_BYTES))
        arrival, base = _in_compute_dtype(
            self.runner,
            t.info.compute_dtype,
            t.arrival_dtype,
            raw,
            (t.base, t.base_array),
            start,
            stop,
        )
        step = self.sweep.sample or 1  # a sample: every step-th entry, only those differenced
        arrival, base = arrival[::step], base[::step]
        delta = _buffer(self.runner, "delta", arrival.size, t.info.compute_dtype)
        subtract_sum_sq(arrival, base, delta)
        state = {slot: v[start:stop:step] for slot, v in t.state.items()}
        self.sweep.update_chunk(t.info, delta, state, self.ctx, start)
