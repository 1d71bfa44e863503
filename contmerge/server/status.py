"""What the server can say about arrivals without reading the journal: recent outcomes by id,
the checkpoint being folded, the last error. Bounded, so a long-running server stays small; the
journal keeps the full history."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from typing import Any, Literal

from .journal import JournalRecord

#: what ``GET /uploads/<id>`` says of an arrival: its final event, or where it waits
UploadStatus = Literal["queued", "folding", "retrying", "folded", "duplicate", "rejected"]


class StatusBoard:
    def __init__(self, remember: int = 10_000, recent: int = 20) -> None:
        self._lock = threading.Lock()
        self._by_id: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self._remember = remember
        self._current: dict[str, Any] | None = None
        self._retrying: dict[str, Any] | None = None
        self.last_error: dict[str, Any] | None = None

    def record(self, entry: JournalRecord) -> None:
        """Note a journal record (accepted or final) under its arrival id, as its JSON line."""
        record = entry.to_json()
        with self._lock:
            key = entry.arrival.id
            self._by_id[key] = record
            self._by_id.move_to_end(key)
            while len(self._by_id) > self._remember:
                self._by_id.popitem(last=False)
            if entry.final:
                self._recent.appendleft(record)
            if entry.event == "rejected":
                self.last_error = record

    def lookup(self, checkpoint_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._by_id.get(checkpoint_id)

    def folding(self, checkpoint_id: str | None, name: str | None = None) -> None:
        with self._lock:
            self._current = (
                None
                if checkpoint_id is None
                else {"id": checkpoint_id, "name": name, "since": time.time()}
            )

    @property
    def current(self) -> dict[str, Any] | None:
        with self._lock:
            return dict(self._current) if self._current else None

    def retry(self, info: dict[str, Any] | None) -> None:
        """The arrival waiting to be folded again (``next_attempt`` in Unix time), or None."""
        with self._lock:
            self._retrying = dict(info) if info else None

    @property
    def retrying(self) -> dict[str, Any] | None:
        """The arrival being retried, with ``next_attempt_in`` seconds and a one-line message."""
        with self._lock:
            if self._retrying is None:
                return None
            info = dict(self._retrying)
        wait = max(0, round(info.pop("next_attempt") - time.time()))
        info["next_attempt_in"] = wait
        info["message"] = f"retrying: {info['reason']}, next attempt in {wait} s"
        return info

    def upload_status(self, checkpoint_id: str) -> dict[str, Any] | None:
        """The arrival's last record with its ``status`` (an :data:`UploadStatus`; ``retry``
        too while it is retried), or None for an id not remembered."""
        record = self.lookup(checkpoint_id)
        if record is None:
            return None
        if record.get("event") != "accepted":
            return {**record, "status": record.get("event")}  # a final event
        status: UploadStatus = "queued"
        extra = {}
        current, retrying = self.current, self.retrying
        if current and current["id"] == checkpoint_id:
            status = "folding"
        elif retrying and retrying["id"] == checkpoint_id:
            status, extra = "retrying", {"retry": retrying}
        return {**record, **extra, "status": status}

    def recent(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._recent)
