"""HTTP uploads, from their first byte to queued or refused: the service's side of
``POST /checkpoints``. The HTTP layer turns the request into chunks of body and hands them over;
:class:`Uploads` and its :class:`Upload` handles name, bound, write, validate (bodycheck.py),
journal and queue them.

Two kinds of body: a safetensors file (its header length is checked as soon as its first 8
bytes are in, its header parsed once the body is complete), or a tar of a checkpoint directory
(unpacked safely into the spool, then recognised as the inbox recognises a directory).

An upload's life: ``Uploads.begin`` (refusals before any body: bad name, too large, queue full,
too many uploads at once) → ``receive`` the body (each chunk counted against the size limit, the
header length checked at the 8th byte, the idle timeout and the rate floor applied, written in
~1 MiB blocks off the event loop) → ``finish`` (validated, made durable, journaled ``accepted``,
queued) or ``abort`` (journaled ``rejected`` when refused, its slot and temp files given back: a
client that went away, a bug). ``receive`` runs on the event loop; ``begin``, ``finish`` and
``abort`` touch the disk (fsync) and run on a worker thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .bodycheck import (
    SAFETENSORS,
    BodyKind,
    Refusal,
    body_kind,
    check_file,
    check_prefix,
    check_unpacked,
    storage_refusal,
)
from .headercheck import PREFIX_BYTES
from .journal import Arrival, Journal, JournalRecord
from .metrics import ServerMetrics
from .spool import BadName, Spool, check_name
from .status import StatusBoard
from .tarball import TarLimits, TarRefused, unpack
from .workqueue import WorkItem, WorkQueue

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from .service import ServeSettings

log = logging.getLogger("contmerge.server")
MAX_REFUSED_NAME = 200  # a refused name is journaled, cut to this length
WRITE_BLOCK = 1 << 20  # the body is gathered into ~1 MiB writes, done off the event loop


@dataclass(frozen=True)
class Accepted:
    """An upload made durable, journaled and queued: what the 202 says."""

    id: str
    name: str
    bytes: int
    sha256: str
    queue_depth: int


class InFlight:
    """Uploads whose body is still arriving, bounded apart from the queue."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._count = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._count

    def take(self) -> bool:
        with self._lock:
            if self._count >= self.limit:
                return False
            self._count += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self._count -= 1


@dataclass
class Uploads:
    """The HTTP door of the service: starts uploads, refuses, accepts and queues them."""

    settings: ServeSettings
    spool: Spool
    queue: WorkQueue
    journal: Journal
    board: StatusBoard
    metrics: ServerMetrics
    retry_after: Callable[[], int]

    def __post_init__(self) -> None:
        self.in_flight = InFlight(self.settings.max_concurrent_uploads)

    def begin(
        self, raw_name: str, content_type: str, format_param: str | None, declared: int | None
    ) -> Upload:
        """An upload whose body is about to stream in (``declared``: its Content-Length), or
        a Refusal, journaled when it is an arrival: a bad name (400), too large (413), an
        unknown format (400), the server full (503, not journaled), its disk failing (507).

        Only uploads in flight are counted here; a queue slot is taken once the body is in.
        """
        checkpoint_id = self.spool.new_id()
        shown = raw_name
        try:
            name = shown = check_name(raw_name)
            limit = self.settings.max_upload_bytes
            if declared is not None and declared > limit:
                # refused before reading: with "Expect: 100-continue" (curl) nothing is even sent
                raise Refusal(413, f"upload of {declared} bytes is over the limit of {limit} bytes")
            kind = body_kind(content_type, format_param, name)
            return self._start(checkpoint_id, name, kind, declared)
        except BadName as exc:
            raise self.refuse(Refusal(400, str(exc)), checkpoint_id, shown) from None
        except Refusal as refusal:
            raise self.refuse(refusal, checkpoint_id, shown) from None

    def _start(self, checkpoint_id: str, name: str, kind: BodyKind, declared: int | None) -> Upload:
        if self.queue.full():
            raise self.busy("queue full, retry later")
        if not self.in_flight.take():
            raise self.busy(
                f"{self.in_flight.limit} uploads in progress, the most this server takes at "
                "once (--max-concurrent-uploads); retry later"
            )
        try:
            return Upload(self, checkpoint_id, name, kind, declared)
        except OSError as exc:
            self.in_flight.give_back()
            raise storage_refusal(exc) from exc

    def busy(self, reason: str) -> Refusal:
        """A 503 (counted): the client should send again after Retry-After seconds."""
        self.metrics.busy.inc()
        return Refusal(503, reason, journal=False, retry_after=self.retry_after())

    def refuse(
        self, refusal: Refusal, checkpoint_id: str, name: str, size: int | None = None
    ) -> Refusal:
        """Count a refusal and journal it when it is an arrival at all; the refusal, to raise."""
        if refusal.status_code == 408:
            self.metrics.timed_out.inc()
        elif refusal.status_code == 507:
            self.metrics.no_space.inc()
        if not refusal.journal:
            return refusal
        refusal.checkpoint_id = checkpoint_id
        arrival = Arrival(checkpoint_id, "http", name[:MAX_REFUSED_NAME], None)
        entry = JournalRecord("rejected", arrival, reason=refusal.reason, bytes=size)
        self.metrics.rejected.inc(1, "http")
        try:
            self.board.record(self.journal.append(entry))
        except OSError:  # the journal's disk is the one that is full: say it all the same
            log.warning("upload %s refused (%s), not journaled", checkpoint_id, refusal.reason)
            self.board.record(entry)
        return refusal

    def accept(self, arrival: Arrival, path: Path, size: int, client: str | None) -> None:
        """Journal and queue an upload spooled at ``path`` whose queue slot is reserved."""
        entry = JournalRecord("accepted", arrival, bytes=size, client=client)
        self.board.record(self.journal.append(entry))
        self.metrics.accepted.inc(1, "http")
        self.metrics.upload_bytes.inc(size)
        self.queue.put_reserved(self.work_item(arrival, path))

    def work_item(self, arrival: Arrival, path: Path) -> WorkItem:
        """The writer's work for a spooled upload: fold it, then remove it from the spool."""
        return WorkItem(arrival, path, finish=lambda _event, _reason: self.spool.discard(path))


class Upload:
    """One upload in progress (see the module's docstring for its life)."""

    def __init__(
        self, door: Uploads, checkpoint_id: str, name: str, kind: BodyKind, declared: int | None
    ) -> None:
        self._door = door
        self.id = checkpoint_id
        self.name = name
        self.kind = kind
        self.declared = declared  # Content-Length, when the client sent one
        self.size = 0
        self.prefix = b""
        self.digest = hashlib.sha256()
        self.started = time.monotonic()
        self._committed = False
        self._released = False
        self.temp, self.handle = door.spool.open_temp(checkpoint_id)

    # --- on the event loop ------------------------------------------------------------------
    async def receive(self, body: AsyncIterator[tuple[bytes, bool]]) -> None:
        """Take the whole body, as ``(chunk, more to come)`` pairs, into the temp file.

        Refusal as soon as the body cannot be taken: over the size limit (413), a header length
        the body cannot hold or over ``max_header_bytes`` (400/413), nothing for the idle
        timeout or slower than the rate floor (408). Whatever ``body`` raises (the client went
        away) passes through; the caller then calls :meth:`abort`.
        """
        from anyio.to_thread import run_sync  # the server's thread pool, as for finish/abort

        pending = bytearray()
        while True:
            try:
                chunk, more = await asyncio.wait_for(anext(body), timeout=self.idle_timeout)
            except asyncio.TimeoutError:
                raise self._stalled() from None
            except StopAsyncIteration:
                break
            if chunk:
                self._count(chunk)
                pending += chunk
                if len(pending) >= WRITE_BLOCK:
                    data, pending = pending, bytearray()
                    await run_sync(self._write, data)
            if not more:
                break
            self._pace()
        await run_sync(self._write, pending)

    @property
    def idle_timeout(self) -> float:
        """Seconds the body may send nothing before it is cut (408)."""
        return self._door.settings.upload_idle_timeout

    def _count(self, chunk: bytes) -> None:
        """Count a chunk of the body; Refusal as soon as the body cannot be taken."""
        self.size += len(chunk)
        limit = self._door.settings.max_upload_bytes
        if self.size > limit:
            raise Refusal(413, f"upload is over the limit of {limit} bytes")
        if self.kind == SAFETENSORS and len(self.prefix) < PREFIX_BYTES:
            self.prefix += chunk[: PREFIX_BYTES - len(self.prefix)]
            if len(self.prefix) == PREFIX_BYTES:
                self._check_prefix(self.declared)

    def _pace(self) -> None:
        """Refusal (408) for a body averaging less than the minimum rate once the idle timeout
        has passed: a client too slow to wait for."""
        idle, floor = self.idle_timeout, self._door.settings.upload_min_rate
        elapsed = time.monotonic() - self.started
        if floor > 0 and elapsed > idle and self.size < floor * elapsed:
            raise Refusal(
                408,
                f"upload too slow: {self.size} bytes in {elapsed:.0f} s, below the "
                f"minimum of {floor:g} bytes/s (--upload-min-rate)",
            )

    def _stalled(self) -> Refusal:
        """The refusal (408) of a body that sent nothing for the idle timeout."""
        return Refusal(
            408, f"upload stalled: no data for {self.idle_timeout:g} s (--upload-idle-timeout)"
        )

    def _check_prefix(self, size: int | None) -> None:
        check_prefix(self.prefix, size, self._door.settings.max_header_bytes)

    # --- on a worker thread -----------------------------------------------------------------
    def _write(self, data: bytes | bytearray) -> None:
        self.digest.update(data)
        try:
            self.handle.write(data)
        except OSError as exc:
            raise storage_refusal(exc) from exc

    def finish(self, client: str | None) -> Accepted:
        """Validate, make durable, journal and queue; Refusal when the body cannot be taken
        (then :meth:`abort` with it)."""
        door = self._door
        sha256 = self.digest.hexdigest()
        arrival = Arrival.upload(self.id, self.name, sha256)
        try:
            self.handle.flush()
            if self.kind == SAFETENSORS:
                self._check_prefix(self.size)  # the length must fit the body as it came
                check_file(self.temp, door.settings.max_header_bytes)
            if not door.queue.reserve():  # only complete uploads hold a queue slot
                raise door.busy("queue full, retry later")
            try:
                path = self._commit()
                try:
                    door.accept(arrival, path, self.size, client)
                except OSError:
                    self._forget(path)  # not journaled, not acknowledged: not accepted
                    raise
            except BaseException:
                door.queue.release()
                raise
        except OSError as exc:
            raise storage_refusal(exc) from exc
        self._release()
        return Accepted(self.id, self.name, self.size, sha256, len(door.queue))

    def abort(self, refusal: Refusal | None = None) -> None:
        """Give the upload up: journal ``refusal`` (when given) and release what the upload
        holds (its slot, its temp file, its unpacking). Does nothing once finished or aborted."""
        if self._released:
            return
        if refusal is not None:
            self._door.refuse(refusal, self.id, self.name, self.size)
        self._release()

    def _commit(self) -> Path:
        spool = self._door.spool
        if self.kind == SAFETENSORS:
            path = spool.commit(self.temp, self.handle, self.id, self.name)
            self._committed = True
            return path
        self.handle.close()
        settings = self._door.settings
        limits = TarLimits(settings.max_upload_bytes, settings.max_tar_members)
        target = spool.unpack_dir(self.id)
        try:
            root = unpack(self.temp, target, limits)
            check_unpacked(root, settings.max_header_bytes)
            path = spool.commit_dir(root, self.id, self.name)
        except TarRefused as exc:
            raise Refusal(exc.status_code, exc.reason) from exc
        finally:
            spool.discard(target)
        self._committed = True
        spool.discard(self.temp)  # the tar itself: its content is unpacked
        return path

    def _forget(self, path: Path) -> None:
        """Undo a commit whose journal line could not be written: not accepted after all."""
        self._door.spool.discard(path)
        self._committed = False

    def _release(self) -> None:
        self._released = True
        if not self.handle.closed:
            self.handle.close()
        if not self._committed:
            spool = self._door.spool
            spool.discard(self.temp)
            spool.discard(spool.unpack_dir(self.id))
        self._door.in_flight.give_back()
