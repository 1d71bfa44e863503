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
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, get_args

Event = Literal["accepted", "folded", "duplicate", "rejected"]
FinalEvent = Literal["folded", "duplicate", "rejected"]
Origin = Literal["http", "inbox"]
FINAL_EVENTS: frozenset[str] = frozenset(get_args(FinalEvent))
EVENTS: frozenset[str] = frozenset(get_args(Event))
ORIGINS: frozenset[str] = frozenset(get_args(Origin))
JOURNAL_FILE = "journal.jsonl"


@dataclass(frozen=True)
class Arrival:
    """Who an arrival is: what every journal line about it starts with, and what it carries
    from its ``accepted`` line to its final one (the upload's sha256, the inbox signature)."""

    id: str
    origin: Origin
    name: str
    label: str | None  # its source in the manifest; None for an upload refused before it had one
    sha256: str | None = None
    signature: list[Any] | None = None  # an inbox entry's, so that a restart knows it again

    @staticmethod
    def upload(checkpoint_id: str, name: str, sha256: str | None = None) -> Arrival:
        return Arrival(checkpoint_id, "http", name, f"upload/{checkpoint_id}/{name}", sha256)

    @staticmethod
    def inbox(checkpoint_id: str, name: str, signature: list[Any]) -> Arrival:
        label = f"inbox/{checkpoint_id}/{name}"
        return Arrival(checkpoint_id, "inbox", name, label, signature=signature)


@dataclass(frozen=True)
class JournalRecord:
    """One journal line, written or read: every line is built and parsed here and nowhere else.

    On disk a line is the JSON object of :meth:`to_json`, ``time`` first (stamped by
    :meth:`Journal.append`); :meth:`from_json` reads it back, lines of earlier runs included.
    """

    event: Event
    arrival: Arrival
    reason: str | None = None
    bytes: int | None = None  # of an upload
    client: str | None = None  # address an upload came from
    content_hash: str | None = None  # of a fold's outcome: the Merger's arrival record
    index: int | None = None
    seconds: float | None = None
    recovered: bool = False  # re-queued from the spool, or folded before a crash cut its line
    time: str | None = None  # ISO 8601, UTC; None until the journal appends the line

    @property
    def final(self) -> bool:
        """The writer is done with the arrival (folded, duplicate or rejected)."""
        return self.event in FINAL_EVENTS

    def to_json(self) -> dict[str, Any]:
        """The line as a JSON object: fields left unset are left out."""
        arrival = self.arrival
        fields: dict[str, Any] = {
            "time": self.time,
            "event": self.event,
            "id": arrival.id,
            "origin": arrival.origin,
            "name": arrival.name,
            "label": arrival.label,
            "reason": self.reason,
            "bytes": self.bytes,
            "client": self.client,
            "content_hash": self.content_hash,
            "index": self.index,
            "seconds": self.seconds,
            "recovered": self.recovered or None,
            "sha256": arrival.sha256,
            "signature": arrival.signature,
        }
        return {key: value for key, value in fields.items() if value is not None}

    @staticmethod
    def from_json(line: dict[str, Any]) -> JournalRecord | None:
        """The record of a parsed line, or None for a line that is none (no id, an unknown
        event or origin). Lines written before the records were typed (dicts built in several
        places, ``"client": null`` kept) read the same: every key was, and is, optional but
        these three."""
        event, origin, checkpoint_id = line.get("event"), line.get("origin"), line.get("id")
        if event not in EVENTS or origin not in ORIGINS or not isinstance(checkpoint_id, str):
            return None
        signature = line.get("signature")
        arrival = Arrival(
            checkpoint_id,
            origin,
            str(line.get("name", "")),
            _text(line.get("label")),
            _text(line.get("sha256")),
            list(signature) if isinstance(signature, list) else None,
        )
        index, size, seconds = line.get("index"), line.get("bytes"), line.get("seconds")
        return JournalRecord(
            event,
            arrival,
            reason=_text(line.get("reason")),
            bytes=size if isinstance(size, int) else None,
            client=_text(line.get("client")),
            content_hash=_text(line.get("content_hash")),
            index=index if isinstance(index, int) else None,
            seconds=float(seconds) if isinstance(seconds, (int, float)) else None,
            recovered=line.get("recovered") is True,
            time=_text(line.get("time")),
        )


def _text(value: object) -> str | None:
    return None if value is None else str(value)


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

    def append(self, entry: JournalRecord) -> JournalRecord:
        """Write ``entry`` durably, stamped with the time; the record as written."""
        stamped = replace(entry, time=now_iso())
        record = stamped.to_json()
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
        return stamped

    def records(self) -> Iterator[JournalRecord]:
        """Every well-formed record, oldest first (a torn line from a crash is skipped)."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                entry = JournalRecord.from_json(record) if isinstance(record, dict) else None
                if entry is not None:
                    yield entry

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
