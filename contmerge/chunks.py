"""Run a function over consecutive chunks of work on several threads.

A fold's per-chunk work (compiled loops, xxh3, torch copies) releases the GIL, so chunks are
folded on several cores at once. Each thread takes one contiguous run of chunks, so memory is
streamed in order; the calling thread takes the first run itself.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

#: bandwidth, not arithmetic, bounds a fold: more threads than this rarely help
DEFAULT_MAX_WORKERS = 4


def default_workers() -> int:
    return max(1, min(DEFAULT_MAX_WORKERS, os.cpu_count() or 1))


class ChunkRunner:
    """A small pool of threads, plus per-thread scratch buffers reused from chunk to chunk."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, workers if workers is not None else default_workers())
        self._pool = (
            ThreadPoolExecutor(self.workers - 1, thread_name_prefix="contmerge-fold")
            if self.workers > 1
            else None
        )
        self._local = threading.local()

    def scratch(self, key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """This thread's buffer ``key`` of ``numel`` entries (contents undefined)."""
        buffers: dict[tuple[str, torch.dtype], torch.Tensor] = self._local.__dict__.setdefault(
            "buffers", {}
        )
        buffer = buffers.get((key, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = buffers[(key, dtype)] = torch.empty(numel, dtype=dtype)
        return buffer[:numel]

    def map(self, items: list[T], work: Callable[[list[T]], list[R]]) -> list[R]:
        """Hand each thread one consecutive run of ``items``; ``work(run)`` returns one result
        per item of its run. Results in the order of ``items``."""
        if self._pool is None or len(items) < 2:
            return work(items)
        runs = _split(items, min(self.workers, len(items)))
        futures: list[Future[list[R]]] = [self._pool.submit(work, run) for run in runs[1:]]
        try:
            first = work(runs[0])
        finally:
            wait(futures)  # never leave a thread writing into buffers the caller moves on from
        return first + [result for future in futures for result in future.result()]

    @contextmanager
    def exclusive_torch_threads(self) -> Iterator[None]:
        """With several fold threads, torch ops inside them run single-threaded (no nested
        OpenMP teams fighting over the same cores); restored afterwards."""
        if self._pool is None:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _split(items: list[T], parts: int) -> list[list[T]]:
    size, extra = divmod(len(items), parts)
    runs, start = [], 0
    for k in range(parts):
        stop = start + size + (1 if k < extra else 0)
        runs.append(items[start:stop])
        start = stop
    return runs
