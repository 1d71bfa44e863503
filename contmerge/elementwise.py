"""The fast path of elementwise rules: tensors folded 1 MiB at a time, on several threads.

Tensors are gathered into batches of about ``BATCH_BYTES`` of arrival, so the threads hand work
over once per batch rather than once per tensor (a model's many small tensors would otherwise
cost more in hand-overs than in folding). Each thread takes one consecutive run of the batch's
chunks; each chunk is read into a buffer that stays in cache, hashed, differenced against the
base, summed for the checks, and folded by the rule's ``fold_into``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .chunks import ChunkRunner
from .hashing import LEAF_BYTES, leaf_digest
from .kernels import subtract_sum_sq, sum_sq
from .sources import ChunkReader
from .strategy import Arrays, FoldContext, State, Strategy, TensorInfo

#: arrival bytes per chunk: whole hash leaves, small enough to stay in cache between the steps
CHUNK_BYTES = LEAF_BYTES
#: arrival bytes gathered before the threads are set to work (a durable state holds the batch's
#: new state in memory until it is written)
BATCH_BYTES = 16 << 20


@dataclass
class _Tensor:
    info: TensorInfo
    read: ChunkReader  # the arrival's entries, chunk by chunk
    base: torch.Tensor  # flat view, the base's dtype
    base_array: np.ndarray | None  # the same as numpy when it is already the compute dtype
    old: Arrays  # flat views of the current state
    target: State  # the new state, as the store will keep it
    out: Arrays  # flat numpy views of ``target``

    @property
    def chunk(self) -> int:
        return CHUNK_BYTES // self.info.meta.dtype.itemsize


@dataclass(frozen=True)
class Folded:
    """One tensor of a batch, folded: its hash leaves and ‖θ_t − θ0‖² (NaN/Inf if any is)."""

    info: TensorInfo
    target: State
    leaves: list[bytes]
    sum_sq: float


class ElementwiseBatch:
    """Tensors waiting to be folded together; ``run`` folds them all."""

    def __init__(self, strategy: Strategy, runner: ChunkRunner, ctx: FoldContext) -> None:
        self.strategy, self.runner, self.ctx = strategy, runner, ctx
        self.tensors: list[_Tensor] = []
        self.nbytes = 0

    def add(
        self, info: TensorInfo, read: ChunkReader, base: torch.Tensor, old: State, target: State
    ) -> None:
        flat = base.reshape(-1)
        same = info.meta.dtype == info.compute_dtype  # else half precision: δ in float32
        self.tensors.append(
            _Tensor(
                info,
                read,
                flat,
                flat.numpy() if same else None,
                {k: v.reshape(-1).numpy() for k, v in old.items()},
                target,
                {k: v.view(-1).numpy() for k, v in target.items()},
            )
        )
        self.nbytes += info.meta.nbytes

    @property
    def full(self) -> bool:
        return self.nbytes >= BATCH_BYTES

    def run(self) -> list[Folded]:
        """Fold every chunk of every tensor; results per tensor, in the order added."""
        items = [
            (k, start, min(start + t.chunk, t.info.meta.numel))
            for k, t in enumerate(self.tensors)
            for start in range(0, t.info.meta.numel, t.chunk)
        ]
        with self.runner.exclusive_torch_threads():
            results = self.runner.map(items, self._fold_run)
        leaves: list[list[bytes]] = [[] for _ in self.tensors]
        sums: list[list[float]] = [[] for _ in self.tensors]
        for (k, _, _), (digest, part) in zip(items, results):
            leaves[k].append(digest)
            sums[k].append(part)
        folded = [
            Folded(t.info, t.target, leaves[k], float(np.sum(sums[k])) if sums[k] else 0.0)
            for k, t in enumerate(self.tensors)
        ]
        self.tensors, self.nbytes = [], 0
        return folded

    def _fold_run(self, items: list[tuple[int, int, int]]) -> list[tuple[bytes, float]]:
        """One thread's consecutive chunks; all per-chunk data stays in its own buffers."""
        runner, strategy, ctx = self.runner, self.strategy, self.ctx
        results = []
        for k, start, stop in items:
            t = self.tensors[k]
            dtype, compute = t.info.meta.dtype, t.info.compute_dtype
            x = t.read(start, stop, runner.scratch("arrival", t.chunk, dtype))
            leaf = leaf_digest(x.view(torch.uint8).numpy())
            delta = runner.scratch("delta", t.chunk, compute).numpy()[: stop - start]
            if t.base_array is not None:
                base = t.base_array[start:stop]
                sq = subtract_sum_sq(x.numpy(), base, delta)
            else:
                widened = runner.scratch("base", t.chunk, compute)[: stop - start]
                widened.copy_(t.base[start:stop])
                torch.from_numpy(delta).copy_(x).sub_(widened)
                base, sq = widened.numpy(), sum_sq(delta)
            strategy.fold_into(
                t.info,
                {k: v[start:stop] for k, v in t.out.items()},
                {k: v[start:stop] for k, v in t.old.items()},
                delta,
                base,
                ctx,
                start,
            )
            results.append((leaf, sq))
        return results
