"""The writer: the one thread that owns the Merger and folds checkpoints one after another.

For each arrival the order of durable steps is what makes a crash harmless:

1. ``Merger.fold`` commits the new state atomically (or raises and leaves it untouched);
2. the outcome is appended to the journal (fsync'd);
3. the arrival is cleared: its spool file removed, or its inbox entry moved to done/rejected.

Killed between 1 and 2, a restart folds the arrival again; the Merger sees the same content
hash already folded *under the same label* and changes nothing, and the writer records it as
folded (``recovered``). Killed between 2 and 3, the restart reads the outcome from the journal
and only clears the arrival. Either way each accepted checkpoint is folded exactly once.

Only a fault of the checkpoint itself (CheckpointError) rejects it. A failure of the server's
(disk full or an I/O error in the state directory, out of memory, a state that changed under
the writer) keeps the arrival where it is and tries it again, first after 1 s, then after twice
as long each time up to a minute, for as long as it takes: an accepted upload was promised a
fold. Any other exception is a bug; it gets a few attempts, then the arrival is rejected naming
the internal error, so that one bad arrival cannot stall the queue forever.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import torch

from ..errors import CheckpointError, ContmergeError, StateError
from ..merger import Merger
from ..tensorfile import CODE_BY_DTYPE, header_limit, using_header_limit
from .journal import FinalEvent, Journal, JournalRecord
from .metrics import ServerMetrics
from .status import StatusBoard
from .workqueue import Call, WorkItem, WorkQueue

log = logging.getLogger("contmerge.server")
MERGED_PREFIX = "merged-"
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
ATTEMPTS_OF_A_BUG = 3


class RetryLater(Exception):
    """The fold failed for a reason of the server's; ``reason`` is safe to show clients."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def retry_delay(attempts: int) -> float:
    """Seconds before attempt ``attempts + 1``: 1, 2, 4, ... up to a minute."""
    return min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** max(0, attempts - 1))


def is_servers_fault(exc: BaseException) -> bool:
    """A failure a retry can outlive: of the disk, the memory, or the state, not the input."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (OSError, MemoryError, StateError)):
            return True
        if isinstance(seen, RuntimeError) and "can't allocate memory" in str(seen):
            return True  # how torch's CPU allocator reports out of memory
        seen = seen.__cause__ or seen.__context__
    return False


def server_reason(exc: BaseException, state_dir: Path, doing: str = "folding") -> str:
    """A failure of the server's, said without its paths."""
    if isinstance(exc, OSError) and exc.strerror:
        name = errno.errorcode.get(exc.errno or 0, "")
        text = exc.strerror[:1].lower() + exc.strerror[1:] + (f" ({name})" if name else "")
        return f"{text} while {doing}"
    if isinstance(exc, MemoryError):
        return f"out of memory while {doing}"
    return f"{type(exc).__name__}: {exc}".replace(str(state_dir), "<state>")


def describe(exc: Exception, item: WorkItem) -> str:
    """The reason for a client: what is wrong and where, without the server's own paths."""
    name, label = item.arrival.name, item.arrival.label
    if isinstance(exc, CheckpointError):
        text = exc.reason
        if exc.tensor:
            text += f" (tensor {exc.tensor!r})"
        if exc.source not in (str(item.path), label):
            text += f" (in {Path(exc.source).name})"
        return text
    if isinstance(exc, ContmergeError):
        return str(exc).replace(str(item.path), name)
    return f"fold failed: {type(exc).__name__}: {exc}".replace(str(item.path), name)


class _Recorded(Protocol):
    @property
    def index(self) -> int: ...

    @property
    def source(self) -> str: ...

    def to_json(self) -> dict[str, Any]: ...


class _Sourced(Protocol):
    @property
    def source(self) -> str: ...


class StateView(Protocol):
    """What the server reads of the manifest of the state it serves: a ``manifest.Manifest``,
    or for an FW state ``fw_served.FwManifest``, which has the same attributes."""

    @property
    def strategy(self) -> str: ...

    @property
    def base(self) -> _Sourced: ...

    @property
    def generation(self) -> int: ...

    @property
    def count(self) -> int: ...

    @property
    def arrivals(self) -> Sequence[_Recorded]: ...

    def to_json(self) -> dict[str, Any]:
        """The body of ``GET /manifest``."""
        ...


class Writer(threading.Thread):
    def __init__(
        self,
        merger: Merger,
        queue: WorkQueue,
        journal: Journal,
        board: StatusBoard,
        metrics: ServerMetrics,
        emit_dir: Path,
        out_dtype: torch.dtype | None = None,
        max_header_bytes: int | None = None,
    ) -> None:
        super().__init__(name="contmerge-writer", daemon=True)
        self.out_dtype = out_dtype
        self.merger = merger
        self.queue = queue
        self.journal = journal
        self.board = board
        self.metrics = metrics
        self.emit_dir = emit_dir
        self.max_header_bytes = header_limit(max_header_bytes)
        emit_dir.mkdir(parents=True, exist_ok=True)
        for leftover in emit_dir.glob(".*.tmp"):  # an emit cut short by a crash
            leftover.unlink()
        # the manifest as of the last commit; other threads read this, never the Merger
        self.manifest: StateView = merger.manifest
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
        self.queue.close()

    def run(self) -> None:
        # a thread starts with no context: the bound the folds and emits read under is set here
        with using_header_limit(self.max_header_bytes):
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
        arrival = item.arrival
        self.board.folding(arrival.id, arrival.name)
        try:
            outcome = self._fold(item)
            # a fold that committed and then failed to be journaled is recognised on its retry
            # (same content, same label) and recorded as folded once
            record = self.journal.append(outcome)
        except RetryLater as exc:
            self._retry(item, exc.reason)
            return
        except OSError as exc:  # the journal's disk
            self._retry(item, server_reason(exc, self.emit_dir.parent, "journaling the fold"))
            return
        finally:
            self.manifest = self.merger.manifest
            self.board.folding(None)
        self.board.retry(None)
        self._count(outcome)
        self.board.record(record)
        reason = outcome.reason
        log.info("%s %s%s", outcome.event, arrival.label, f": {reason}" if reason else "")
        try:
            item.finish(outcome.event, reason)
        except OSError:
            log.exception("could not clear %s after %s", arrival.label, outcome.event)

    def _retry(self, item: WorkItem, reason: str) -> None:
        """Keep the arrival (its spool file, its inbox entry) and try it again later."""
        arrival = item.arrival
        item.attempts += 1
        delay = retry_delay(item.attempts)
        self.metrics.retries.inc(1, arrival.origin)
        self.board.retry(
            {
                "id": arrival.id,
                "name": arrival.name,
                "origin": arrival.origin,
                "attempts": item.attempts,
                "reason": reason,
                "next_attempt": time.time() + delay,
            }
        )
        log.warning(
            "fold of %s failed (%s): attempt %d, next in %.0f s",
            arrival.label,
            reason,
            item.attempts,
            delay,
        )
        self.queue.put_back(item, delay)

    def _fold(self, item: WorkItem) -> JournalRecord:
        """The journal line of the fold's outcome; RetryLater when the server is at fault."""
        arrival = item.arrival
        try:
            result = self.merger.fold(item.path, name=arrival.label)
        except CheckpointError as exc:
            return JournalRecord("rejected", arrival, reason=describe(exc, item))
        except Exception as exc:  # the fold is atomic: the state is intact either way
            if is_servers_fault(exc):
                raise RetryLater(server_reason(exc, self.emit_dir.parent)) from exc
            log.exception("fold of %s failed", arrival.label)
            if item.attempts + 1 < ATTEMPTS_OF_A_BUG:
                raise RetryLater(describe(exc, item)) from exc
            reason = (
                f"{describe(exc, item)} (an internal error, after {ATTEMPTS_OF_A_BUG} attempts; "
                "the server's log has the details)"
            )
            return JournalRecord("rejected", arrival, reason=reason)
        event: FinalEvent = "folded"
        reason, recovered = None, False
        if result.status != "folded":
            earlier = next((a for a in self.merger.arrivals if a.index == result.index), None)
            source = None if earlier is None else earlier.source
            if source == arrival.label:
                # committed before a crash, not yet journaled: the same arrival, not a copy
                recovered = True
            else:
                event = "duplicate"
                reason = f"same content as #{result.index} ({source})"
        return JournalRecord(
            event,
            arrival,
            reason=reason,
            content_hash=result.content_hash,
            index=result.index,
            seconds=round(result.seconds, 4),
            recovered=recovered,
        )

    def _count(self, outcome: JournalRecord) -> None:
        origin = outcome.arrival.origin
        if outcome.event == "rejected":
            self.metrics.rejected.inc(1, origin)
            return
        self.metrics.fold_seconds.observe(outcome.seconds or 0.0)
        self.metrics.last_fold.set(time.time())
        if outcome.event == "folded":
            self.metrics.folded.inc(1, origin)
        else:
            self.metrics.duplicates.inc(1, origin)

    # --- runs on this thread through WorkQueue.call ---------------------------------------
    def open_merged(self) -> tuple[IO[bytes], dict[str, int]]:
        """The merged model of the current generation as an open file (emitted once per
        generation; the handle stays readable after a newer generation replaces the file)."""
        generation = self.merger.manifest.generation
        # the dtype is in the name: a restart with another --out-dtype must not serve the old
        dtype = "base" if self.out_dtype is None else CODE_BY_DTYPE[self.out_dtype].lower()
        path = self.emit_dir / f"{MERGED_PREFIX}{generation:08d}-{dtype}.safetensors"
        if not path.exists():
            self.merger.emit(path, out_dtype=self.out_dtype)
            for old in self.emit_dir.glob(f"{MERGED_PREFIX}*.safetensors"):
                if old != path:
                    with contextlib.suppress(FileNotFoundError):
                        old.unlink()
        handle = open(path, "rb")
        return handle, {"generation": generation, "count": self.merger.count}
