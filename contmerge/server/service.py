"""The merge service: the Merger, its writer thread, the queue, the spool, the journal and the
inbox wired together, with the recovery that makes a restart pick up where a crash left off.

The HTTP layer (app.py) only calls the public methods of this object and of the
:class:`~.upload.Upload` handle that ``begin_upload`` returns (``receive``, ``finish``,
``abort``); tests/test_layering.py holds it to that. Nothing here knows about HTTP.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..dtypes import parse_out_dtype
from ..errors import ContmergeError
from ..merger import DEFAULT_MAX_RELATIVE_DELTA, Merger
from ..merger_options import MergerOptions
from ..tensorfile import header_limit, using_header_limit
from .inbox import InboxEntry, InboxWatcher, is_ignored
from .journal import JOURNAL_FILE, Arrival, Journal, JournalRecord
from .metrics import ServerMetrics
from .spool import SPOOL_DIR, Spool, id_sequence, spooled_bytes
from .status import StatusBoard
from .upload import Upload, Uploads
from .worker import Writer
from .workqueue import WorkItem, WorkQueue

log = logging.getLogger("contmerge.server")
EMIT_DIR = "server-cache"
DEFAULT_MAX_UPLOAD_BYTES = 16 * 1024**3
DEFAULT_QUEUE_SIZE = 64
DEFAULT_MAX_CONCURRENT_UPLOADS = 16
DEFAULT_UPLOAD_IDLE_TIMEOUT = 30.0
DEFAULT_UPLOAD_MIN_RATE = 16 * 1024  # bytes/s, averaged once the idle timeout has passed
DEFAULT_MAX_TAR_MEMBERS = 10_000


@dataclass
class ServeSettings:
    state: Path
    base: str
    strategy: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    linear: str | None = None
    max_relative_delta: float | None = DEFAULT_MAX_RELATIVE_DELTA
    inbox: Path | None = None
    poll_interval: float = 1.0
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    queue_size: int = DEFAULT_QUEUE_SIZE
    max_concurrent_uploads: int = DEFAULT_MAX_CONCURRENT_UPLOADS
    upload_idle_timeout: float = DEFAULT_UPLOAD_IDLE_TIMEOUT
    upload_min_rate: float = DEFAULT_UPLOAD_MIN_RATE
    # $CONTMERGE_MAX_HEADER_BYTES, else 16 MiB, as for the CLI
    max_header_bytes: int = field(default_factory=header_limit)
    max_tar_members: int = DEFAULT_MAX_TAR_MEMBERS
    #: dtype of the merged float tensors served (None: the base's; ``contmerge.dtypes``)
    out_dtype: str | None = None
    #: compute threads of a fold or emit (None: the default; ``contmerge.threads``)
    threads: int | None = None
    #: fw: the objective (a dataset file or module:function) and the model it names
    objective: str | None = None
    model: str | None = None


def _data_merger(settings: ServeSettings) -> Any:
    """FW-Merging's served state when ``--strategy`` names fw or the state is one (else None)."""
    import argparse

    from ..data_cli import kind_of

    kind = kind_of(argparse.Namespace(state=settings.state, strategy=settings.strategy))
    if kind is None:
        return None
    if kind != "fw":
        raise ContmergeError(f"contmerge serve runs FW-Merging and the fold rules, not {kind}")
    from ..fw_served import ServedFw

    return ServedFw(
        settings.state, settings.base, settings.objective, settings.hparams, settings.model
    )


class MergeService:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.started = time.time()
        self.out_dtype = parse_out_dtype(settings.out_dtype)  # refused before the state is opened
        # opening the Merger takes the state's lock: a second server on this state fails here
        with using_header_limit(settings.max_header_bytes):  # the base's header too
            options = MergerOptions(
                strategy=settings.strategy,
                settings=settings.hparams,
                linear=settings.linear,
                max_relative_delta=settings.max_relative_delta,
                threads=settings.threads,
            )
            self.merger = _data_merger(settings) or Merger(
                settings.base, options.strategy, settings.state, **options.merger_kwargs()
            )
        try:
            self._setup(settings)
        except BaseException:
            self.merger.close()
            raise

    def _setup(self, settings: ServeSettings) -> None:
        state = settings.state
        self.journal = Journal(state / JOURNAL_FILE)
        self.board = StatusBoard()
        self.metrics = ServerMetrics()
        self.queue = WorkQueue(settings.queue_size)
        self.spool = Spool(state / SPOOL_DIR)
        self.uploads = Uploads(
            settings,
            self.spool,
            self.queue,
            self.journal,
            self.board,
            self.metrics,
            self.retry_after,
        )
        self.writer = Writer(
            self.merger,
            self.queue,
            self.journal,
            self.board,
            self.metrics,
            state / EMIT_DIR,
            self.out_dtype,
            settings.max_header_bytes,
        )
        self.inbox: InboxWatcher | None = None
        if settings.inbox is not None:
            self.inbox = InboxWatcher(
                settings.inbox,
                self._submit_inbox,
                settings.poll_interval,
                self.merger.strategy.needs_extras,
                settings.max_header_bytes,
            )
        self._add_gauges()
        self._recover()

    def _add_gauges(self) -> None:
        gauge = self.metrics.gauge
        gauge("contmerge_queue_depth", "Checkpoints waiting for the writer.", self.queue.__len__)
        gauge("contmerge_queue_capacity", "Bound of the queue.", lambda: self.queue.capacity)
        gauge(
            "contmerge_state_count",
            "Checkpoints folded into the state.",
            lambda: self.writer.manifest.count,
        )
        gauge(
            "contmerge_state_generation",
            "Commits of the state.",
            lambda: self.writer.manifest.generation,
        )
        gauge(
            "contmerge_writer_busy", "1 while a fold runs.", lambda: self.board.current is not None
        )
        gauge("contmerge_start_time_seconds", "Unix time the server started.", lambda: self.started)
        gauge(
            "contmerge_stalled_arrivals",
            "Arrivals held up while a fold is retried: the retried one and those behind it.",
            lambda: len(self.queue) if self.board.retrying else 0,
        )
        gauge(
            "contmerge_uploads_in_progress",
            "Uploads whose body is still arriving or being checked.",
            self.uploads.in_flight.__len__,
        )

    # --- recovery ---------------------------------------------------------------------------
    def _recover(self) -> None:
        """Re-queue what was accepted and not finished; finish what was finished but not cleared."""
        spooled = self.spool.pending()
        spool_ids = {s.id for s in spooled}
        inbox_names = set()
        if self.settings.inbox is not None:
            inbox_names = {n for n in os.listdir(self.settings.inbox) if not is_ignored(n)}
        last_of: dict[str, JournalRecord] = {}
        self._inbox_memory: dict[str, JournalRecord] = {}
        tail: deque[JournalRecord] = deque(maxlen=1000)
        highest = 0
        for record in self.journal.records():
            arrival = record.arrival
            highest = max(highest, id_sequence(arrival.id))
            if arrival.id in spool_ids:
                last_of[arrival.id] = record
            elif arrival.origin == "inbox" and arrival.name in inbox_names:
                self._inbox_memory[arrival.name] = record
            tail.append(record)
        for record in tail:
            self.board.record(record)
        self.spool.continue_after(highest)
        for spooled_item in spooled:
            last = last_of.get(spooled_item.id)
            if last is not None and last.final:
                self.spool.discard(spooled_item.path)  # journaled, then killed before clearing
                continue
            path = spooled_item.path
            sha256 = None if last is None else last.arrival.sha256
            arrival = Arrival.upload(spooled_item.id, spooled_item.name, sha256)
            if last is None:  # renamed into the spool, then killed before the journal line
                size = spooled_bytes(path)
                self._journal(JournalRecord("accepted", arrival, bytes=size, recovered=True))
            self.queue.put_recovered(self.uploads.work_item(arrival, path))
        if spooled:
            log.info("re-queued %d upload(s) from the spool", len(self.queue))

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self.writer.start()
        if self.inbox is not None:
            self.inbox.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking work; let a running fold commit (it is atomic either way)."""
        if self.inbox is not None:
            self.inbox.stop()
        self.writer.stop()
        if self.writer.is_alive():
            self.writer.join(timeout)
        if self.inbox is not None and self.inbox.is_alive():
            self.inbox.join(timeout)

    def close(self) -> None:
        if not self.writer.is_alive():
            self.merger.close()
        self.journal.close()

    # --- arrivals -----------------------------------------------------------------------------
    def _journal(self, entry: JournalRecord) -> JournalRecord:
        written = self.journal.append(entry)
        self.board.record(written)
        return written

    def begin_upload(
        self,
        name: str,
        content_type: str = "",
        format_param: str | None = None,
        declared: int | None = None,
    ) -> Upload:
        """Take an upload whose body is about to stream in (blocking: a refusal is journaled).

        Raises :class:`~.bodycheck.Refusal` at once for what can be refused before the body: a bad
        name, a declared size over the limit, an unknown format, a full server (503).
        """
        return self.uploads.begin(name, content_type, format_param, declared)

    def _submit_inbox(self, entry: InboxEntry) -> bool:
        """Called by the inbox watcher for a complete entry; False when the queue is full."""
        assert self.inbox is not None
        inbox = self.inbox
        memory = self._inbox_memory.pop(entry.name, None)
        if memory is not None and memory.arrival.signature != entry.signature:
            memory = None  # same name, different file: a new arrival
        if memory is not None and memory.final:
            # journaled before a crash, not moved yet
            inbox.settle(entry, memory.arrival.id, memory.event, memory.reason)
            return True
        if entry.refused is not None:  # rejected as it is: nothing to fold, no slot needed
            checkpoint_id = memory.arrival.id if memory is not None else self.spool.new_id()
            arrival = Arrival.inbox(checkpoint_id, entry.name, entry.signature)
            self._journal(JournalRecord("rejected", arrival, reason=entry.refused))
            self.metrics.rejected.inc(1, "inbox")
            inbox.settle(entry, checkpoint_id, "rejected", entry.refused)
            return True
        if not self.queue.reserve():
            if memory is not None:
                self._inbox_memory[entry.name] = memory
            return False
        checkpoint_id = memory.arrival.id if memory is not None else self.spool.new_id()
        arrival = Arrival.inbox(checkpoint_id, entry.name, entry.signature)
        if memory is None:
            self._journal(JournalRecord("accepted", arrival))
            self.metrics.accepted.inc(1, "inbox")
        self.queue.put_reserved(
            WorkItem(
                arrival,
                entry.path,
                finish=lambda event, reason: inbox.settle(entry, checkpoint_id, event, reason),
            )
        )
        return True

    # --- reading ------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Checkpoints folded into the state."""
        return self.writer.manifest.count

    @property
    def pending(self) -> int:
        """Checkpoints waiting for the writer."""
        return len(self.queue)

    def upload_status(self, checkpoint_id: str) -> dict[str, Any] | None:
        """An arrival's last journal line with its ``status`` (see :data:`~.status.UploadStatus`),
        or None when the server does not know the id (any more)."""
        return self.board.upload_status(checkpoint_id)

    def metrics_text(self) -> str:
        """The metrics in Prometheus' text format."""
        return self.metrics.render()

    def manifest(self) -> dict[str, Any]:
        return self.writer.manifest.to_json()

    def open_merged(self, timeout: float = 3600.0) -> tuple[IO[bytes], dict[str, int]]:
        """The current merged model, emitted by the writer between two folds. OSError when
        there is no room to emit it; ContmergeError, without the server's paths, when the state
        cannot be emitted (a merge over the base's dtype, a checksum mismatch)."""
        try:
            return self.queue.call(self.writer.open_merged).result(timeout)
        except ContmergeError as exc:  # said to clients
            raise ContmergeError(str(exc).replace(str(self.settings.state), "<state>")) from exc

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one fold, at least 1, at most 60."""
        return int(min(60, max(1, round(self.metrics.fold_seconds.mean() + 0.5))))

    def healthy(self) -> bool:
        return self.writer.is_alive()

    def status(self) -> dict[str, Any]:
        manifest = self.writer.manifest
        folded = [record.to_json() for record in manifest.arrivals[-20:]]
        metrics = self.metrics
        inbox = self.inbox
        return {
            "state": {
                "directory": str(self.settings.state),
                "strategy": manifest.strategy,
                "base": manifest.base.source,
                "count": manifest.count,
                "generation": manifest.generation,
            },
            "queue": {
                "depth": len(self.queue),
                "capacity": self.queue.capacity,
                "folding": self.board.current,
                "retrying": self.board.retrying,
            },
            "uploads": {
                "in_progress": len(self.uploads.in_flight),
                "max_concurrent": self.uploads.in_flight.limit,
            },
            "totals": {  # since this process started; the journal has the whole history
                "accepted": int(metrics.accepted.total()),
                "folded": int(metrics.folded.total()),
                "duplicates": int(metrics.duplicates.total()),
                "rejected": int(metrics.rejected.total()),
                "backpressure": int(metrics.busy.total()),
            },
            "last_error": self.board.last_error,
            "recent": self.board.recent(),
            "folded": folded[::-1],
            "inbox": None
            if inbox is None
            else {
                "directory": str(inbox.directory),
                "scans": inbox.scans,
                "waiting": inbox.waiting,
            },
            "limits": {
                "max_upload_bytes": self.settings.max_upload_bytes,
                "max_header_bytes": self.settings.max_header_bytes,
                "max_tar_members": self.settings.max_tar_members,
                "upload_idle_timeout": self.settings.upload_idle_timeout,
                "upload_min_rate": self.settings.upload_min_rate,
            },
            "uptime_seconds": round(time.time() - self.started, 3),
        }
