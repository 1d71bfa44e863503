"""The writer: the one thread that owns the Merger and folds checkpoints one after another.

For each arrival the order of durable steps is what makes a crash harmless:

1. ``Merger.fold`` commits the new state atomically (or raises and leaves it untouched);
2. the outcome is appended to the journal (fsync'd);
3. the arrival is cleared: its spool file removed, or its inbox entry moved to done/rejected.

Killed between 1 and 2, a restart folds the arrival again; the Merger sees the same content
hash already folded *under the same label* and changes nothing, and the writer records it as
folded (``recovered``). Killed between 2 and 3, the restart reads the outcome from the journal
and only clears the arrival. Either way each accepted checkpoint is folded exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import IO, Any

from ..errors import CheckpointError, ContmergeError
from ..merger import Merger
from .journal import Journal
from .metrics import ServerMetrics
from .status import StatusBoard
from .workqueue import Call, WorkItem, WorkQueue

log = logging.getLogger("contmerge.server")
MERGED_PREFIX = "merged-"


def describe(exc: Exception, item: WorkItem) -> str:
    """The reason for a client: what is wrong and where, without the server's own paths."""
    if isinstance(exc, CheckpointError):
        text = exc.reason
        if exc.tensor:
            text += f" (tensor {exc.tensor!r})"
        if exc.source not in (str(item.path), item.label):
            text += f" (in {Path(exc.source).name})"
        return text
    if isinstance(exc, ContmergeError):
        return str(exc).replace(str(item.path), item.name)
    return f"fold failed: {type(exc).__name__}: {exc}".replace(str(item.path), item.name)


class Writer(threading.Thread):
    def __init__(
        self,
        merger: Merger,
        queue: WorkQueue,
        journal: Journal,
        board: StatusBoard,
        metrics: ServerMetrics,
        emit_dir: Path,
    ) -> None:
        super().__init__(name="contmerge-writer", daemon=True)
        self.merger = merger
        self.queue = queue
        self.journal = journal
        self.board = board
        self.metrics = metrics
        self.emit_dir = emit_dir
        emit_dir.mkdir(parents=True, exist_ok=True)
        for leftover in emit_dir.glob(".*.tmp"):  # an emit cut short by a crash
            leftover.unlink()
        # the manifest as of the last commit; other threads read this, never the Merger
        self.manifest: dict[str, Any] = merger.manifest
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
        self.queue.close()

    def run(self) -> None:
        while not self._stopping.is_set():
            task = self.queue.get(timeout=0.5)
            try:
                if isinstance(task, Call):
                    self._run_call(task)
                elif isinstance(task, WorkItem):
                    self._process(task)
            except Exception:  # keep serving; the failure is logged and shown in status
                log.exception("writer: unexpected failure")

    def _run_call(self, call: Call) -> None:
        try:
            call.future.set_result(call.function())
        except Exception as exc:
            call.future.set_exception(exc)

    def _process(self, item: WorkItem) -> None:
        self.board.folding(item.id, item.name)
        try:
            event, reason, fields = self._fold(item)
            # if this append fails the arrival stays pending on disk and is retried on restart
            record = self.journal.append(
                {
                    "event": event,
                    "id": item.id,
                    "origin": item.origin,
                    "name": item.name,
                    "label": item.label,
                    **fields,
                    **({"reason": reason} if reason else {}),
                    **item.extra,
                }
            )
        finally:
            self.manifest = self.merger.manifest
            self.board.folding(None)
        self._count(event, item, fields)
        self.board.record(record)
        log.info("%s %s%s", event, item.label, f": {reason}" if reason else "")
        try:
            item.finish(event, reason)
        except OSError:
            log.exception("could not clear %s after %s", item.label, event)

    def _fold(self, item: WorkItem) -> tuple[str, str | None, dict[str, Any]]:
        try:
            result = self.merger.fold(item.path, name=item.label)
        except ContmergeError as exc:
            return "rejected", describe(exc, item), {}
        except Exception as exc:  # a bug or I/O trouble; the fold is atomic, the state intact
            log.exception("fold of %s failed", item.label)
            return "rejected", describe(exc, item), {}
        fields: dict[str, Any] = {
            "content_hash": result.content_hash,
            "index": result.index,
            "seconds": round(result.seconds, 4),
        }
        if result.status == "folded":
            return "folded", None, fields
        earlier = next((a for a in self.merger.arrivals if a["index"] == result.index), {})
        if earlier.get("source") == item.label:
            # committed before a crash, not yet journaled: this is the same arrival, not a copy
            return "folded", None, {**fields, "recovered": True}
        return "duplicate", f"same content as #{result.index} ({earlier.get('source')})", fields

    def _count(self, event: str, item: WorkItem, fields: dict[str, Any]) -> None:
        if event == "rejected":
            self.metrics.rejected.inc(1, item.origin)
            return
        self.metrics.fold_seconds.observe(float(fields.get("seconds", 0.0)))
        self.metrics.last_fold.set(time.time())
        if event == "folded":
            self.metrics.folded.inc(1, item.origin)
        else:
            self.metrics.duplicates.inc(1, item.origin)

    # --- runs on this thread through WorkQueue.call ---------------------------------------
    def open_merged(self) -> tuple[IO[bytes], dict[str, int]]:
        """The merged model of the current generation as an open file (emitted once per
        generation; the handle stays readable after a newer generation replaces the file)."""
        generation = int(self.merger.manifest["generation"])
        path = self.emit_dir / f"{MERGED_PREFIX}{generation:08d}.safetensors"
        if not path.exists():
            self.merger.emit(path)
            for old in self.emit_dir.glob(f"{MERGED_PREFIX}*.safetensors"):
                if old != path:
                    with contextlib.suppress(FileNotFoundError):
                        old.unlink()
        handle = open(path, "rb")
        return handle, {"generation": generation, "count": self.merger.count}
