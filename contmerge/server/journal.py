"""The arrival journal: one JSON line per event, appended and fsync'd before anyone is told.

Every arrival (an HTTP upload or an inbox checkpoint) gets an ``accepted`` line when it is
durably queued and one final line (``folded``, ``duplicate`` or ``rejected``) when the writer is
done with it; uploads refused before they were queued get a single ``rejected`` line. The
journal is what a restart reads to tell finished work from pending work, and what an operator
reads to see what happened to a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

FINAL_EVENTS = frozenset({"folded", "duplicate", "rejected"})
JOURNAL_FILE = "journal.jsonl"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Journal:
    """Append-only JSONL file; safe to append from several threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # a SIGKILL in the middle of a write can leave a torn last line: start on a fresh one
        size = os.fstat(self._fd).st_size
        if size:
            with open(path, "rb") as handle:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":
                    os.write(self._fd, b"\n")

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write ``record`` (stamped with the time) durably and return it as written."""
        record = {"time": now_iso(), **record}
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            start = os.fstat(self._fd).st_size
            view = memoryview(line)
            try:
                while view:
                    view = view[os.write(self._fd, view) :]
                os.fsync(self._fd)
            except OSError:
                # a full disk can take half a line: cut it, or the next line would be glued on
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)
                raise
        return record

    def records(self) -> Iterator[dict[str, Any]]:
        """Every well-formed record, oldest first (a torn line from a crash is skipped)."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    yield record

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
