"""One HTTP upload, from its first byte to queued or refused: the service's side of
``POST /checkpoints``. The HTTP layer reads the body and hands it over; this object bounds it,
writes it, validates it and makes it durable.

Two kinds of body: a safetensors file (its header length is checked as soon as its first 8
bytes are in, its header parsed once the body is complete), or a tar of a checkpoint directory
(unpacked safely into the spool, then recognised as the inbox recognises a directory).

``check`` is cheap and runs on the event loop; ``write``, ``finish`` and ``close`` touch the
disk (fsync) and run on a worker thread.
"""

from __future__ import annotations

import errno
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..sources import LoraCheckpoint
from ..tensorfile import SafetensorsReader
from .headercheck import PREFIX_BYTES, header_problem
from .inbox import Refused, header_refusal_in, inspect_entry
from .tarball import TarLimits, TarRefused, unpack

if TYPE_CHECKING:
    from .service import MergeService

SAFETENSORS, TAR = "safetensors", "tar"
TAR_TYPES = ("application/x-tar", "application/tar")
HOW_TO_SEND = (
    "the body must be a .safetensors file, or a checkpoint directory (LoRA adapter, sharded "
    "or model directory) sent as a tar with Content-Type: application/x-tar"
)
LORA_FILE = (
    "this is a LoRA adapter's weights (lora_A/lora_B tensors) without its adapter_config.json "
    "(rank, alpha, target modules): send the adapter directory as a tar with Content-Type: "
    "application/x-tar (MergeClient.upload(directory) does that)"
)
NO_CHECKPOINT = (
    "no checkpoint in the tar: {why} (expected, at its top or under one folder: "
    "model.safetensors, or model.safetensors.index.json with its shards, or a PEFT adapter's "
    "adapter_config.json with adapter_model.safetensors)"
)


class Refusal(Exception):
    """An upload refused before it was queued (not journaled yet)."""

    def __init__(
        self, status_code: int, reason: str, journal: bool = True, retry_after: int | None = None
    ) -> None:
        super().__init__(reason)
        self.status_code = status_code
        self.reason = reason
        self.journal = journal  # a 503 is not an arrival: nothing was received, nothing to note
        self.retry_after = retry_after


def storage_refusal(exc: OSError) -> Refusal:
    """The server's own disk failed while taking an upload: 507 when it is full, else 500."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return Refusal(
            507,
            "no space left on device on the server for this upload; retry later",
            retry_after=60,
        )
    return Refusal(500, f"the server could not store the upload: {exc.strerror or exc}")


def body_kind(content_type: str, format_param: str | None, name: str) -> str:
    """``tar`` for a tar upload (by Content-Type, ``?format=tar`` or a ``.tar`` name)."""
    if format_param is not None:
        if format_param not in (SAFETENSORS, TAR):
            raise Refusal(400, f"unknown format {format_param[:40]!r}: use safetensors or tar")
        return format_param
    media = content_type.split(";", 1)[0].strip().lower()
    return TAR if media in TAR_TYPES or name.endswith(".tar") else SAFETENSORS


def _is_lora_weights(reader: SafetensorsReader) -> bool:
    return any(LoraCheckpoint._LORA.match(key) for key in reader.meta)


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
class Upload:
    service: MergeService
    id: str
    name: str
    kind: str
    declared: int | None  # Content-Length, when the client sent one

    def __post_init__(self) -> None:
        self.size = 0
        self.prefix = b""
        self.digest = hashlib.sha256()
        self._committed = False
        self._closed = False
        self.temp, self.handle = self.service.spool.open_temp(self.id)

    # --- on the event loop ------------------------------------------------------------------
    def check(self, chunk: bytes) -> None:
        """Count a chunk of the body; Refusal as soon as the body cannot be taken."""
        self.size += len(chunk)
        limit = self.service.settings.max_upload_bytes
        if self.size > limit:
            raise Refusal(413, f"upload is over the limit of {limit} bytes")
        if self.kind == SAFETENSORS and len(self.prefix) < PREFIX_BYTES:
            self.prefix += chunk[: PREFIX_BYTES - len(self.prefix)]
            if len(self.prefix) == PREFIX_BYTES:
                self._check_prefix(self.declared)

    def _check_prefix(self, size: int | None) -> None:
        limit = self.service.settings.max_header_bytes
        problem = header_problem(self.prefix, size, limit)
        if problem is not None:
            status, reason = problem
            raise Refusal(status, f"{reason}; {HOW_TO_SEND}" if status == 422 else reason)

    # --- on a worker thread -----------------------------------------------------------------
    def write(self, data: bytes | bytearray) -> None:
        self.digest.update(data)
        try:
            self.handle.write(data)
        except OSError as exc:
            raise storage_refusal(exc) from exc

    def finish(self, client: str | None) -> dict[str, Any]:
        """Validate, make durable, journal and queue; the ``accepted`` record."""
        service = self.service
        try:
            self.handle.flush()
            if self.kind == SAFETENSORS:
                self._check_prefix(self.size)  # the length must fit the body as it came
                self._validate_file()
            if not service.queue.reserve():  # only complete uploads hold a queue slot
                raise service.busy("queue full, retry later")
            try:
                path = self._commit()
                record = service.accept_upload(self, path, client)
            except BaseException:
                service.queue.release()
                raise
        except OSError as exc:
            raise storage_refusal(exc) from exc
        return record

    def _validate_file(self) -> None:
        try:
            reader = SafetensorsReader(self.temp)  # truncation, garbage, pickles
        except CheckpointError as exc:
            raise Refusal(422, f"{exc.reason}; {HOW_TO_SEND}") from exc
        with reader:
            if _is_lora_weights(reader):
                raise Refusal(422, LORA_FILE)

    def _commit(self) -> Path:
        spool = self.service.spool
        if self.kind == SAFETENSORS:
            path = spool.commit(self.temp, self.handle, self.id, self.name)
            self._committed = True
            return path
        self.handle.close()
        settings = self.service.settings
        limits = TarLimits(settings.max_upload_bytes, settings.max_tar_members)
        target = spool.unpack_dir(self.id)
        try:
            root = unpack(self.temp, target, limits)
            signature, why = inspect_entry(root, root)
            if signature is None:
                raise Refusal(422, NO_CHECKPOINT.format(why=why))
            problem = header_refusal_in(root, settings.max_header_bytes)
            if problem is not None:
                raise Refusal(422, problem)
            path = spool.commit_dir(root, self.id, self.name)
        except TarRefused as exc:
            raise Refusal(exc.status_code, exc.reason) from exc
        except Refused as exc:
            raise Refusal(422, str(exc)) from exc
        finally:
            spool.discard(target)
        self._committed = True
        spool.discard(self.temp)  # the tar itself: its content is unpacked
        return path

    def forget(self, path: Path) -> None:
        """Undo a commit whose journal line could not be written: not accepted after all."""
        self.service.spool.discard(path)
        self._committed = False

    def close(self) -> None:
        """Release what an upload that was not accepted holds (its temp file, its unpacking)."""
        if self._closed:
            return
        self._closed = True
        if not self.handle.closed:
            self.handle.close()
        if not self._committed:
            self.service.spool.discard(self.temp)
            self.service.spool.discard(self.service.spool.unpack_dir(self.id))
        self.service.in_flight.give_back()
