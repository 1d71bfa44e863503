"""The bounded queue between arrivals (HTTP, inbox) and the single writer thread.

An upload reserves its slot *before* its body is read, so a full queue is refused at once
(503) instead of after the client sent gigabytes. Besides checkpoints, the writer takes calls
(emit the merged model) that jump the queue: a download waits for at most one fold.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# what to do with an arrival once the writer is done with it: (event, reason) -> None
Finisher = Callable[[str, str | None], None]


@dataclass
class WorkItem:
    id: str
    name: str
    origin: str  # "http" or "inbox"
    path: Path
    label: str  # recorded as the arrival's source in the manifest; unique per arrival
    finish: Finisher
    extra: dict[str, Any] = field(default_factory=dict)  # copied into journal records
    enqueued: float = field(default_factory=time.time)


@dataclass
class Call:
    function: Callable[[], Any]
    future: Future = field(default_factory=Future)


class WorkQueue:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("the queue needs room for at least one checkpoint")
        self.capacity = capacity
        self._items: deque[WorkItem] = deque()
        self._calls: deque[Call] = deque()
        self._reserved = 0
        self._closed = False
        self._cond = threading.Condition()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def reserve(self) -> bool:
        """Hold a slot for an upload whose body is still arriving; False when full."""
        with self._cond:
            if len(self._items) + self._reserved >= self.capacity:
                return False
            self._reserved += 1
            return True

    def release(self) -> None:
        with self._cond:
            self._reserved -= 1

    def put_reserved(self, item: WorkItem) -> None:
        with self._cond:
            self._reserved -= 1
            self._items.append(item)
            self._cond.notify_all()

    def try_put(self, item: WorkItem) -> bool:
        with self._cond:
            if len(self._items) + self._reserved >= self.capacity:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def put_recovered(self, item: WorkItem) -> None:
        """Re-queue work accepted before a restart: it was promised, so it ignores the bound."""
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()

    def call(self, function: Callable[[], Any]) -> Future:
        """Run ``function`` on the writer thread before the next checkpoint."""
        call = Call(function)
        with self._cond:
            if self._closed:
                call.future.set_exception(RuntimeError("the server is shutting down"))
                return call.future
            self._calls.append(call)
            self._cond.notify_all()
        return call.future

    def get(self, timeout: float) -> WorkItem | Call | None:
        with self._cond:
            deadline = time.monotonic() + timeout
            while not (self._calls or self._items or self._closed):
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            if self._calls:
                return self._calls.popleft()
            if self._items and not self._closed:
                return self._items.popleft()
            return None

    def close(self) -> None:
        """Stop handing out work; pending calls fail, pending checkpoints stay on disk."""
        with self._cond:
            self._closed = True
            calls, self._calls = list(self._calls), deque()
            self._cond.notify_all()
        for call in calls:
            call.future.set_exception(RuntimeError("the server is shutting down"))
