"""Where the merge state lives: in memory, or in a durable directory.

A state directory holds ``manifest.json`` (strategy, base fingerprint, every arrival folded, the
strategy's globals, and the current generation's checksum) and one
``state-<generation>.safetensors`` file of state tensors named ``<tensor>::<slot>``. A fold
writes a whole new generation beside the old one, then replaces the manifest atomically, then
keeps the old generation's file aside for the next fold to overwrite: a crash at any point
leaves the last committed manifest and the file it names.

A commit happens under the directory's lock (``contmerge.dirlock``): the new file is synced;
the lock must still be the directory's and the manifest still the bytes this process last read
or wrote (compare-and-swap: a writer that lost its lock never overwrites another's fold);
leftovers of crashed folds are removed; the file takes its generation's name (never over an
existing file); the manifest is replaced. Opening a state deletes nothing: it checks the file
the manifest names against its checksum (size, header, run and generation) without reading its
data; ``verify`` and every emit check the data too. A read-only store writes nothing.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import threading
import uuid
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from . import buffers
from .atomic import NamedWrites, atomic_write_bytes, fsync_dir, writing
from .dirlock import BUSY, DirectoryLock
from .errors import CheckpointError, StateError
from .hashing import ALGORITHM, LEAF_BYTES, ContentHash, leaf_digest, tensor_leaves
from .manifest import (
    FORMAT,
    MANIFEST,
    Checksum,
    Manifest,
    dump_manifest,
    is_state_file,
    read_manifest,
    state_file_name,
)
from .strategy import State
from .tensorfile import SafetensorsReader, SafetensorsWriter, TensorMeta

#: a past generation's file, kept to be overwritten by the next fold
SPARE = ".state-spare.tmp"


def slot_key(name: str, slot: str) -> str:
    return f"{name}::{slot}"


def _by_tensor(metas: Mapping[str, TensorMeta]) -> dict[str, dict[str, TensorMeta]]:
    grouped: dict[str, dict[str, TensorMeta]] = {}
    for key, meta in metas.items():
        name, slot = key.rsplit("::", 1)
        grouped.setdefault(name, {})[slot] = meta
    return grouped


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _shares(state: State, other: State) -> bool:
    """Whether any tensor of ``state`` is (a view of) one of ``other``'s."""
    return bool({_storage(t) for t in state.values()} & {_storage(t) for t in other.values()})


def _fits(state: State | None, slots: Mapping[str, TensorMeta]) -> bool:
    return state is not None and {k: TensorMeta.of(t) for k, t in state.items()} == dict(slots)


class MemoryStore:
    """State tensors in a dict; nothing survives the process.

    The previous generation's tensors are kept as the next fold's output buffers, so a fold
    writes into memory that is already mapped (fresh memory costs a page fault per 4 KiB, more
    than the fold itself). Memory is two states, whatever the number of folds.
    """

    def __init__(self, manifest: Manifest, tensors: dict[str, State]) -> None:
        self.manifest = manifest
        self._tensors = tensors
        self._spare: dict[str, State] = {}
        self.path: Path | None = None

    def read(self, name: str) -> State:
        return self._tensors.get(name, {})

    view = read

    def release(self, name: str) -> None:
        pass

    def begin(self, metas: Mapping[str, TensorMeta]) -> _MemoryStaging:
        return _MemoryStaging(_by_tensor(metas), self._spare)

    def holds(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is (a view of) a buffer of ``name``'s state, which a later fold
        will overwrite: whoever hands it out of the engine must copy it."""
        return _storage(tensor) in {_storage(t) for t in self.read(name).values()}

    def begin_check(self) -> None:
        """Nothing to check: memory has no checksum (see ``DiskStore.begin_check``)."""

    def end_check(self) -> None:
        pass

    def commit(self, staging: _MemoryStaging, manifest: Manifest) -> None:
        old, self._tensors = self._tensors, staging.tensors
        # a rule's fold may hand back a tensor of its old state as the new one: never reuse those
        # (a new state written into the buffers handed out for it cannot be one)
        self._spare = {
            name: state
            for name, state in old.items()
            if name in staging.into_targets or not _shares(state, self._tensors.get(name, {}))
        }
        self.manifest = manifest

    def close(self) -> None:
        pass


class _MemoryStaging:
    def __init__(self, slots: dict[str, dict[str, TensorMeta]], spare: dict[str, State]) -> None:
        self.tensors: dict[str, State] = {}
        self._slots, self._spare = slots, spare
        self._targets: dict[str, State] = {}
        self.into_targets: set[str] = set()  # names whose new state is the target handed out

    def target(self, name: str) -> State:
        """Buffers for ``name``'s new state (the old generation's, when they fit)."""
        reused = self._spare.pop(name, None)
        if not _fits(reused, self._slots[name]):
            reused = {k: buffers.empty(m.shape, m.dtype) for k, m in self._slots[name].items()}
        self._targets[name] = reused  # type: ignore[assignment]
        return reused  # type: ignore[return-value]

    def write(self, name: str, state: State) -> None:
        self.tensors[name] = state
        if state is self._targets.get(name):
            self.into_targets.add(name)

    def abort(self) -> None:
        # only buffers handed out here go back: a rule's ``fold`` may return live state tensors
        self._spare.update(self._targets)
        self.tensors, self._targets, self.into_targets = {}, {}, set()


class DiskStore:
    """State tensors in a directory, read lazily one tensor at a time, committed atomically.

    Open with ``open`` (an existing state) or ``create``; ``read_only`` stores take the shared
    lock (if there is a lock file) and write nothing.
    """

    def __init__(
        self,
        path: Path,
        lock: DirectoryLock,
        manifest: Manifest,
        raw: bytes,
        *,
        writable: bool,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.writable = writable
        self._lock = lock
        self._raw = raw  # the manifest's bytes on disk as last read or written: compare-and-swap
        # a format-2 state gets its run id (recorded in each generation's file) at its next commit
        self._run = manifest.run or uuid.uuid4().hex
        self._reader: SafetensorsReader | None = None
        self._checked: dict[str, list[bytes]] | None = None
        # a batch's new state is computed here, then written out: reused across folds
        self._scratch = _Scratch()
        try:
            self._set_reader(self._open_generation())
        except BaseException:
            lock.close()
            raise

    @classmethod
    def open(
        cls, path: Path, *, lock: DirectoryLock | None = None, read_only: bool = False
    ) -> DiskStore:
        """An existing state; without ``lock``, the writer's lock (or a reader's)."""
        if lock is None:
            if not read_only and not path.is_dir():
                raise StateError(f"{path}: no {MANIFEST}; not a contmerge state directory")
            lock = DirectoryLock.shared(path) if read_only else DirectoryLock.exclusive(path)
        try:
            manifest, raw = read_manifest(path)
        except BaseException:
            lock.close()
            raise
        return cls(path, lock, manifest, raw, writable=not read_only)

    @classmethod
    def create(
        cls,
        path: Path,
        lock: DirectoryLock,
        manifest: Manifest,
        initial: Mapping[str, State],
        metas: Mapping[str, TensorMeta],
    ) -> DiskStore:
        """A new state in ``path``, whose writer's ``lock`` the caller took before finding no
        manifest there (so no other process can be creating it too)."""
        try:
            if os.path.lexists(path / MANIFEST):
                raise StateError(f"{path}: a merge state already exists here")
            _clear_for_creation(path)
            manifest = replace(manifest, format=FORMAT, run=uuid.uuid4().hex, generation=0)
            staging = _DiskStaging(path, metas, manifest, _Scratch())
            raw = None
            try:
                for name, state in initial.items():
                    staging.write(name, state)
                manifest = staging.seal(manifest)
                staging.publish()
                raw = dump_manifest(manifest)
                atomic_write_bytes(path / MANIFEST, raw)
            except BaseException:
                # the manifest may have been renamed before a later step failed: then its
                # file stays (the state exists, and the next open finds it)
                staging.committed = raw is not None and _read_or_none(path / MANIFEST) == raw
                staging.discard()
                raise
        except BaseException:
            lock.close()
            raise
        return cls(path, lock, manifest, raw, writable=True)

    def _open_generation(self) -> SafetensorsReader:
        """The file the manifest names, checked cheaply against the recorded checksum."""
        assert self.manifest.state_file is not None  # read_manifest checked it is a plain name
        path = self.path / self.manifest.state_file
        try:
            reader = SafetensorsReader(path)
        except CheckpointError as exc:
            raise StateError(f"{self.path}: state tensors unreadable ({exc})") from exc
        try:
            _check_generation_file(path, reader, self.manifest)
        except BaseException:
            reader.close()
            raise
        return reader

    def _set_reader(self, reader: SafetensorsReader) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = reader
        self._slots: dict[str, dict[str, str]] = {}
        for key in reader.meta:
            if "::" not in key:
                reader.close()
                raise StateError(f"{reader.path}: {key!r} is not a state tensor (<tensor>::<slot>)")
            name, slot = key.rsplit("::", 1)
            self._slots.setdefault(name, {})[slot] = key

    @property
    def slot_metas(self) -> dict[str, TensorMeta]:
        """The layout of the current generation's state tensors."""
        assert self._reader is not None
        return dict(self._reader.meta)

    def read(self, name: str) -> State:
        assert self._reader is not None
        state = {slot: self._reader.read(key) for slot, key in self._slots.get(name, {}).items()}
        if self._checked is not None:
            for slot, key in self._slots.get(name, {}).items():
                self._checked[key] = tensor_leaves(state[slot])
        return state

    def holds(self, name: str, tensor: torch.Tensor) -> bool:
        """Never: ``read`` returns fresh copies."""
        return False

    def view(self, name: str) -> State:
        """The state of ``name`` in place (read-only use; ``release`` when done)."""
        assert self._reader is not None
        return {slot: self._reader.view(key) for slot, key in self._slots.get(name, {}).items()}

    def release(self, name: str) -> None:
        assert self._reader is not None
        for key in self._slots.get(name, {}).values():
            self._reader.release(key)

    # --- integrity ------------------------------------------------------------------------
    def begin_check(self) -> None:
        """From now on, ``read`` hashes what it reads, for ``end_check``."""
        self._checked = {}

    def end_check(self) -> None:
        """If every state tensor was read since ``begin_check``, check them against the
        generation's checksum (an emit reads them all anyway)."""
        checked, self._checked = self._checked, None
        checksum = self.manifest.checksum
        assert self._reader is not None
        if checksum is None or checked is None or checked.keys() != self._reader.meta.keys():
            return
        content = ContentHash()
        for key, meta in self._reader.meta.items():
            content.add(key, meta.dtype, meta.shape, checked[key])
        if content.hexdigest() != checksum.content:
            raise _corrupt_data(self._reader.path)

    def verify(self) -> str:
        """Read every byte of the current generation and check it against the checksum in the
        manifest; a line saying what was checked (StateError on a mismatch)."""
        reader = self._reader
        assert reader is not None
        checksum = self.manifest.checksum
        if checksum is None:
            return (
                f"{reader.path}: readable, but no checksum is recorded (a {self.manifest.format}"
                " state): the next fold records one"
            )
        content, buffer = ContentHash(), np.empty(LEAF_BYTES, dtype=np.uint8)
        for key, meta in reader.meta.items():
            leaves = []
            for offset in range(0, meta.nbytes, LEAF_BYTES):
                piece = buffer[: min(LEAF_BYTES, meta.nbytes - offset)]
                leaves.append(leaf_digest(reader.read_bytes(key, offset, piece)))
            content.add(key, meta.dtype, meta.shape, leaves)
        if content.hexdigest() != checksum.content:
            raise _corrupt_data(reader.path)
        return (
            f"{reader.path}: {len(reader.meta)} state tensors, {checksum.bytes} bytes, match "
            f"the checksum of generation {self.manifest.generation}"
        )

    # --- committing -----------------------------------------------------------------------
    def begin(self, metas: Mapping[str, TensorMeta]) -> _DiskStaging:
        self._require_writable()
        self._checked = None  # a fold's reads are not an emit's (one left unfinished)
        next_manifest = replace(
            self.manifest, run=self._run, generation=self.manifest.generation + 1
        )
        return _DiskStaging(self.path, metas, next_manifest, self._scratch, self.path / SPARE)

    def commit(self, staging: _DiskStaging, manifest: Manifest) -> None:
        """Make ``manifest`` (naming ``staging``'s file) the state, or raise and change nothing:
        StateError if another process committed or took the lock since this one opened it."""
        self._require_writable()
        # a format-2 state is upgraded here: format 3, with its run and checksum
        manifest = staging.seal(replace(manifest, format=FORMAT, run=self._run))
        old = self.manifest.state_file
        assert old is not None and manifest.state_file is not None
        self._check_still_ours()
        _remove_leftovers(self.path, keep={old, staging.tmp.name, SPARE})
        staging.publish()
        raw = dump_manifest(manifest)
        try:
            atomic_write_bytes(self.path / MANIFEST, raw)
        except BaseException:
            # the rename may have happened before a later step failed: then it is committed
            staging.committed = _read_or_none(self.path / MANIFEST) == raw
            raise
        staging.committed = True
        self.manifest, self._raw = manifest, raw
        self._set_reader(SafetensorsReader(self.path / manifest.state_file))
        # the old generation is no longer named by the manifest: the next fold overwrites it in
        # place, several times faster than writing a new file (no block allocation, no unlink)
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path / old, self.path / SPARE)

    def _check_still_ours(self) -> None:
        """The compare of the compare-and-swap: our lock is the directory's, and the manifest
        is the one this process read or wrote last."""
        self._lock.check_held()
        if _read_or_none(self.path / MANIFEST) != self._raw:
            raise StateError(
                f"{self.path}: {MANIFEST} changed since this process read it (another process "
                "committed a fold, or it was edited): refusing to commit over it (nothing was "
                "changed; open the state again)"
            )

    def _require_writable(self) -> None:
        if not self.writable:
            raise StateError(f"{self.path}: the state was opened read-only")

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._lock.close()

    def __enter__(self) -> DiskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Scratch:
    """A growable byte buffer carved into state slots, kept mapped from fold to fold. Carvings
    stay valid until ``reset`` (a batch of tensors is folded into several at once)."""

    def __init__(self) -> None:
        self._bytes = buffers.empty((0,), torch.uint8)
        self._used = 0

    def carve(self, slots: Mapping[str, TensorMeta]) -> State:
        sizes = [-(-m.nbytes // 64) * 64 for m in slots.values()]  # each slot cache-line aligned
        if self._used + sum(sizes) > self._bytes.numel():
            # a larger buffer; what was carved so far keeps the old one alive until written
            self._bytes = buffers.empty((2 * self._bytes.numel() + sum(sizes),), torch.uint8)
            self._used = 0
        out = {}
        for (slot, meta), size in zip(slots.items(), sizes):
            piece = self._bytes[self._used : self._used + meta.nbytes]
            out[slot] = piece.view(meta.dtype).view(meta.shape)
            self._used += size
        return out

    def reset(self) -> None:
        self._used = 0


class _DiskStaging:
    """A new generation being written: a temp file that becomes ``state-<gen>.safetensors``.

    Its checksum is computed as it is written: each 1 MiB piece is hashed, then written, while
    it is in cache. The file records the run and generation it belongs to in its header."""

    def __init__(
        self,
        directory: Path,
        metas: Mapping[str, TensorMeta],
        manifest: Manifest,
        scratch: _Scratch,
        spare: Path | None = None,
    ) -> None:
        self.directory = directory
        generation = manifest.generation
        self.final_name = state_file_name(generation)
        self.final = directory / self.final_name
        self.committed = False  # set by the store once the manifest names this file
        self._published = False
        with writing(self.final):
            fd, self.tmp = _own_staging_file(directory, spare)
        self._file = NamedWrites(os.fdopen(fd, "wb"), self.final)
        self._hashing = _HashedWrites(self._file)
        self._content = ContentHash()
        self._metas = metas
        self._slots = _by_tensor(metas)
        self._scratch = scratch
        self._scratch.reset()
        self._pending: set[str] = set()
        metadata = {
            "format": FORMAT,
            "contmerge_run": str(manifest.run),
            "contmerge_generation": str(generation),
            "contmerge_base": manifest.base.fingerprint,
        }
        self._writer = SafetensorsWriter(self._hashing, metas, metadata)  # type: ignore[arg-type]
        self._flusher = _EarlyWriteback(fd)

    def target(self, name: str) -> State:
        """Buffers for ``name``'s new state, valid until it is written."""
        self._pending.add(name)
        return self._scratch.carve(self._slots[name])

    def write(self, name: str, state: State) -> None:
        for slot, tensor in state.items():
            key = slot_key(name, slot)
            self._hashing.start_tensor()
            self._writer.write(key, tensor)
            self._content.add(key, tensor.dtype, tensor.shape, self._hashing.end_tensor())
            self._flusher.wrote(tensor.numel() * tensor.element_size())
        self._pending.discard(name)
        if not self._pending:
            self._scratch.reset()

    def seal(self, manifest: Manifest) -> Manifest:
        """Finish and sync the file; ``manifest`` naming it, with its checksum."""
        self._writer.finish()
        self._file.flush()
        fd = self._file.fileno()
        size = self._file.tell()
        with writing(self.final):
            os.ftruncate(fd, size)  # a reused file may be longer
        self._flusher.close()
        self._hashing.close()
        self._file.sync()  # only what the early writeback has not yet done
        header = _header_digest(fd)
        self._file.close()
        checksum = Checksum(ALGORITHM, size, header, self._content.hexdigest())
        return replace(manifest, state_file=self.final_name, checksum=checksum)

    def publish(self) -> None:
        """Give the file its generation's name, never over an existing file: two writers that
        both lost track of the lock cannot both publish one generation."""
        with writing(self.final):
            try:
                os.link(self.tmp, self.final)
            except FileExistsError as exc:
                raise StateError(
                    f"{self.final} appeared while this fold was committing: {BUSY}; refusing "
                    "to commit (nothing was changed)"
                ) from exc
            except FileNotFoundError as exc:
                raise StateError(
                    f"{self.directory}: this fold's new state file was removed while it was "
                    f"written: {BUSY}? Refusing to commit (nothing was changed)"
                ) from exc
            except OSError:  # a file system without hard links
                if os.path.lexists(self.final):
                    raise
                os.replace(self.tmp, self.final)
            else:
                os.unlink(self.tmp)
            self._published = True
            fsync_dir(self.directory)

    def abort(self) -> None:
        """Give up this generation; its file stays as the spare the next fold overwrites."""
        self._flusher.close()
        self._hashing.close()
        self._file.abandon()
        if self.committed:
            return
        source = self.final if self._published else self.tmp
        with contextlib.suppress(OSError):
            os.replace(source, self.directory / SPARE)

    def discard(self) -> None:
        """Give up this generation and remove its file (a state that was never created)."""
        self._flusher.close()
        self._hashing.close()
        self._file.abandon()
        if self.committed:
            return
        for path in (self.tmp, self.final) if self._published else (self.tmp,):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class _HashedWrites:
    """Passes writes to a file, cutting each tensor's bytes into hash leaves on the way. The
    hashing runs on a helper thread (xxhash's ``update`` releases the GIL) while this thread
    writes the same bytes, so a commit costs the longer of the two, not their sum."""

    def __init__(self, file: NamedWrites) -> None:
        self._file = file
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="contmerge-checksum")
        self._hashing: list[Future[None]] = []
        self._leaf = xxhash.xxh3_128()
        self._filled = 0
        self._leaves: list[bytes] | None = None  # None: not inside a tensor (the header)

    def start_tensor(self) -> None:
        self._leaves, self._filled = [], 0
        self._leaf.reset()

    def end_tensor(self) -> list[bytes]:
        """The tensor's leaf digests, once its bytes are hashed (the caller may reuse them)."""
        for hashing in self._hashing:
            hashing.result()
        self._hashing.clear()
        leaves, self._leaves = self._leaves, None
        assert leaves is not None
        if self._filled:
            leaves.append(self._leaf.digest())
        return leaves

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self._leaves is not None:
            self._hashing.append(self._pool.submit(self._hash, view))
        return self._file.write(view)

    def _hash(self, view: memoryview) -> None:
        """On the helper thread, in the order written: leaves carry over from call to call."""
        assert self._leaves is not None
        done = 0
        while done < len(view):
            piece = view[done : done + LEAF_BYTES - self._filled]
            self._leaf.update(piece)
            done += len(piece)
            self._filled += len(piece)
            if self._filled == LEAF_BYTES:
                self._leaves.append(self._leaf.digest())
                self._leaf.reset()
                self._filled = 0

    def close(self) -> None:
        """Stop the helper thread (after any hashing under way: it reads the caller's bytes)."""
        self._pool.shutdown(wait=True)


class _EarlyWriteback:
    """Syncs a file being written on a helper thread, every ``every`` bytes, so the device
    writes while the fold computes, and the commit's own fsync waits only for the tail."""

    def __init__(self, fd: int, every: int = 64 << 20) -> None:
        self._fd, self._every, self._pending = fd, every, 0
        self._thread: threading.Thread | None = None

    def wrote(self, nbytes: int) -> None:
        self._pending += nbytes
        if self._pending >= self._every and (self._thread is None or not self._thread.is_alive()):
            self._pending = 0
            self._thread = threading.Thread(target=self._sync, name="contmerge-writeback")
            self._thread.start()

    def _sync(self) -> None:
        with contextlib.suppress(OSError):  # the commit's own fsync reports failures
            os.fdatasync(self._fd)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()


def _own_staging_file(directory: Path, spare: Path | None) -> tuple[int, Path]:
    """A temp file this fold alone writes: the spare, renamed first (so two processes can never
    write into one file, even after a lost lock), or a new one."""
    if spare is not None:
        own = directory / f".state-{uuid.uuid4().hex}.tmp"
        try:
            os.rename(spare, own)
        except FileNotFoundError:
            pass
        else:
            return os.open(own, os.O_RDWR), own  # read back: the header digest
    fd, name = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=directory)
    return fd, Path(name)


def _header_digest(fd: int) -> str:
    """xxh3-128 of a safetensors file's length prefix and header (which name the run, the
    generation and every tensor's name, dtype, shape and place)."""
    (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    return xxhash.xxh3_128_hexdigest(os.pread(fd, 8 + length, 0))


def _check_generation_file(path: Path, reader: SafetensorsReader, manifest: Manifest) -> None:
    """The cheap checks on open: the file is the one the manifest's checksum describes (its
    run, generation, base, size and header), without reading its data."""
    checksum = manifest.checksum
    if checksum is None:  # format 2: nothing recorded yet
        return
    metadata = reader.metadata
    found = {
        "run": metadata.get("contmerge_run"),
        "generation": metadata.get("contmerge_generation"),
        "base": metadata.get("contmerge_base"),
    }
    if found["run"] != manifest.run:
        raise StateError(
            f"{path}: belongs to another merge state (run {found['run']}, this state's is "
            f"{manifest.run}): the file was replaced; nothing was changed"
        )
    if found["generation"] != str(manifest.generation):
        raise StateError(
            f"{path}: holds generation {found['generation']}, the manifest is at generation "
            f"{manifest.generation}: the file was replaced; nothing was changed"
        )
    if found["base"] != manifest.base.fingerprint:
        raise StateError(f"{path}: belongs to another base than the manifest's; nothing changed")
    size = path.stat().st_size
    if size != checksum.bytes:
        raise StateError(
            f"{path}: {size} bytes, the manifest records {checksum.bytes}: the file was "
            "truncated or altered; nothing was changed"
        )
    with open(path, "rb") as handle:
        header = _header_digest(handle.fileno())
    if header != checksum.header:
        raise StateError(
            f"{path}: its header does not match the manifest's checksum: the file was altered; "
            "nothing was changed"
        )


def _corrupt_data(path: Path) -> StateError:
    return StateError(
        f"{path}: the tensor data does not match the manifest's checksum: the file is corrupt "
        "(changed bytes); nothing was changed"
    )


def _remove_leftovers(directory: Path, keep: set[str]) -> None:
    """Files of folds that crashed before their commit: other generations' files and the
    engine's temp files (only the engine's own names: others may share the directory)."""
    for entry in directory.iterdir():
        name = entry.name
        temp = name.endswith(".tmp") and name.startswith((".state-", f".{MANIFEST}."))
        if (temp or is_state_file(name)) and name not in keep:
            with writing(entry), contextlib.suppress(FileNotFoundError):
                entry.unlink()


def _clear_for_creation(directory: Path) -> None:
    """Before a state is created where no manifest is: the leftovers of a creation that
    crashed are removed, but never the files of a state whose manifest went missing."""
    later = sorted(n for n in os.listdir(directory) if is_state_file(n) and n != state_file_name(0))
    if later:
        raise StateError(
            f"{directory}: holds {later[-1]} but no {MANIFEST}: refusing to start a new state "
            "over it (restore the manifest, or remove the state files)"
        )
    _remove_leftovers(directory, keep=set())


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
