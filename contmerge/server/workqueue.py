"""The bounded queue between arrivals (HTTP, inbox) and the single writer thread.

Only complete arrivals hold a slot: an upload takes its slot once its body is in, so slow
clients cannot fill the queue (the server bounds uploads in flight separately); a full queue
is still refused at once, before any body is read. Besides checkpoints, the writer takes calls
(emit the merged model) that jump the queue: a download waits for at most one fold. An arrival
whose fold failed for a reason of the server's (a full disk) goes back to the head of the
queue, not to be handed out again before its ``not_before`` time.
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

from .journal import Arrival, Event

# what to do with an arrival once the writer is done with it: (event, reason) -> None
Finisher = Callable[[Event, str | None], None]


@dataclass
class WorkItem:
    arrival: Arrival  # its label is its source in the manifest: unique per arrival
    path: Path
    finish: Finisher
    enqueued: float = field(default_factory=time.time)
    attempts: int = 0  # folds tried and failed for a reason that was not the checkpoint's
    not_before: float = 0.0  # time.monotonic() before which it is not handed out again


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

    def full(self) -> bool:
        with self._cond:
            return len(self._items) + self._reserved >= self.capacity

    def reserve(self) -> bool:
        """Hold a slot for an arrival about to be queued; False when full."""
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

    def put_back(self, item: WorkItem, delay: float) -> None:
        """Return an arrival to the head of the queue, to be retried in ``delay`` seconds (the
        arrivals behind it wait: folding them first would change the arrival order)."""
        item.not_before = time.monotonic() + delay
        with self._cond:
            self._items.appendleft(item)
            self._cond.notify_all()

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
            while True:
                if self._calls:
                    return self._calls.popleft()
                if self._closed:
                    return None
                now = time.monotonic()
                wake = deadline
                if self._items:
                    if self._items[0].not_before <= now:
                        return self._items.popleft()
                    wake = min(deadline, self._items[0].not_before)
                if deadline <= now:
                    return None
                self._cond.wait(wake - now)

    def close(self) -> None:
        """Stop handing out work; pending calls fail, pending checkpoints stay on disk."""
        with self._cond:
            self._closed = True
            calls, self._calls = list(self._calls), deque()
            self._cond.notify_all()
        for call in calls:
            call.future.set_exception(RuntimeError("the server is shutting down"))
