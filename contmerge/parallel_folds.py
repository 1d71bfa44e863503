"""Whole-tensor folds on several threads, for rules whose per-tensor work is heavy (OPCM's SVDs).

A rule that declares ``per_tensor_parallel`` gets its tensors' ``fold`` calls run on a few
threads at once while the engine reads the next tensors; the results are handed on (written to
the staging) in the order the tensors were given, and each fold's ``ctx.add_stat`` calls are
replayed into the arrival's context in that order too: the outcome is the same, bit for bit, as
folding one tensor at a time. torch ops release the GIL; torch runs one intra-op thread per fold
meanwhile, so ``workers`` threads are all the compute threads (``contmerge.threads``): no OpenMP
team waits at a barrier for a member a busy machine has descheduled.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .strategy import FoldContext, State, Strategy, TensorInfo
from .threads import torch_threads

#: bytes of inputs (δ, base, state) held by folds submitted but not yet handed on
MAX_PENDING_BYTES = 256 << 20


@dataclass
class _RecordingContext(FoldContext):
    """The arrival's context as one fold sees it: ``add_stat`` is recorded, not summed."""

    recorded: list[tuple[str, float]] = field(default_factory=list)

    def add_stat(self, key: str, value: float) -> None:
        self.recorded.append((key, float(value)))


@dataclass
class _Pending:
    name: str
    future: Future[State]
    ctx: _RecordingContext
    nbytes: int


class ParallelFolds:
    """``submit`` folds; ``drain`` hands every finished one on, in order. Use as a context."""

    def __init__(
        self,
        strategy: Strategy,
        ctx: FoldContext,
        workers: int,
        write: Callable[[str, State], None],
    ) -> None:
        self.strategy, self.ctx, self.write = strategy, ctx, write
        self.workers = max(1, workers)
        # before the threads start: each takes it on at its first op; restored by close
        self._torch_threads = torch_threads(1)
        self._torch_threads.__enter__()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="contmerge-tensor")
        self._pending: deque[_Pending] = deque()

    def submit(self, info: TensorInfo, state: State, delta: torch.Tensor, base: torch.Tensor):
        """Fold one tensor on a thread; hands on earlier ones while too many are waiting."""
        own = _RecordingContext(**{f.name: getattr(self.ctx, f.name) for f in fields(FoldContext)})
        own.stats = dict(self.ctx.stats)  # what the passes left, read-only for the fold
        nbytes = sum(_nbytes(t) for t in (delta, base, *state.values()))
        future = self._pool.submit(self.strategy.fold, info, state, delta, base, own)
        self._pending.append(_Pending(info.name, future, own, nbytes))
        while len(self._pending) > 2 * self.workers or (
            len(self._pending) > 1 and sum(p.nbytes for p in self._pending) > MAX_PENDING_BYTES
        ):
            self._hand_on()

    def drain(self) -> None:
        while self._pending:
            self._hand_on()

    def _hand_on(self) -> None:
        first = self._pending.popleft()
        new = first.future.result()
        for key, value in first.ctx.recorded:
            self.ctx.add_stat(key, value)
        self.write(first.name, new)

    def close(self) -> None:
        # never leave a thread folding into buffers the caller moves on from
        wait([p.future for p in self._pending])
        self._pending.clear()
        self._pool.shutdown(wait=True)
        self._torch_threads.__exit__(None, None, None)

    def __enter__(self) -> ParallelFolds:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
