"""Run a function over chunks of work on several threads.

A fold's per-chunk work (compiled loops, xxh3, ``pread``) releases the GIL, so chunks are folded
on several cores at once. Threads, the caller's among them, take the next chunk nobody has taken
yet: they finish together however uneven the chunks (a fixed split left one thread idle while
the other finished its larger share, once per batch).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TypeVar

import numpy as np

from .threads import default_threads, torch_threads

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """The fold threads when none are given: the thread budget's default (``contmerge.threads``)."""
    return default_threads()


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

    def scratch(self, key: str, nbytes: int) -> np.ndarray:
        """This thread's byte buffer ``key``, at least ``nbytes`` long (contents undefined)."""
        buffers: dict[str, np.ndarray] = self._local.__dict__.setdefault("buffers", {})
        buffer = buffers.get(key)
        if buffer is None or buffer.size < nbytes:
            buffer = buffers[key] = np.empty(nbytes, dtype=np.uint8)
        return buffer[:nbytes]

    def map(self, items: list[T], work: Callable[[T], R]) -> list[R]:
        """``work(item)`` for every item, on all threads; results in the order of ``items``. The
        first error stops the taking of items and is raised once every thread has stopped."""
        if self._pool is None or len(items) < 2:
            return [work(item) for item in items]
        results: list[R | None] = [None] * len(items)
        taken = itertools.count()  # its ``next`` is atomic under the GIL
        failed = threading.Event()

        def drain() -> None:
            try:
                for k in taken:
                    if k >= len(items) or failed.is_set():
                        return
                    results[k] = work(items[k])
            except BaseException:
                failed.set()
                raise

        helpers = [self._pool.submit(drain) for _ in range(min(self.workers, len(items)) - 1)]
        try:
            drain()
        finally:
            wait(helpers)  # never leave a thread writing into buffers the caller moves on from
        for helper in helpers:
            helper.result()
        return results  # type: ignore[return-value]

    @contextmanager
    def exclusive_torch_threads(self) -> Iterator[None]:
        """With several fold threads, torch ops inside them run single-threaded (no nested
        OpenMP teams fighting over the same cores); restored afterwards."""
        if self._pool is None:
            yield
            return
        with torch_threads(1):
            yield

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
