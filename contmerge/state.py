"""Where the merge state lives: in memory, or in a durable directory.

A state directory holds ``manifest.json`` (strategy, base fingerprint, every arrival folded, the
strategy's globals) and one ``state-<generation>.safetensors`` file of state tensors named
``<tensor>::<slot>``. A fold writes a whole new generation beside the old one, then replaces
the manifest atomically, then deletes the old generation: a crash at any point leaves the last
committed manifest and the file it names.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch

from . import buffers
from .atomic import atomic_write_bytes, fsync_dir
from .errors import CheckpointError, StateError
from .strategy import State
from .tensorfile import SafetensorsReader, SafetensorsWriter, TensorMeta

MANIFEST = "manifest.json"
#: a past generation's file, kept to be overwritten by the next fold (removed at open)
SPARE = ".state-spare.tmp"
FORMAT = "contmerge-state/2"  # 2: content hashes are xxh3-128 trees (contmerge.hashing)


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

    def __init__(self, manifest: dict[str, Any], tensors: dict[str, State]) -> None:
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

    def commit(self, staging: _MemoryStaging, manifest: dict[str, Any]) -> None:
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
    """State tensors in a directory, read lazily one tensor at a time, committed atomically."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self._lock = _lock_directory(path)
        self._reader: SafetensorsReader | None = None
        # a batch's new state is computed here, then written out: reused across folds
        self._scratch = _Scratch()
        self._open_current()

    @classmethod
    def create(
        cls,
        path: Path,
        manifest: dict[str, Any],
        initial: Mapping[str, State],
        metas: Mapping[str, TensorMeta],
    ) -> DiskStore:
        path.mkdir(parents=True, exist_ok=True)
        if (path / MANIFEST).exists():
            raise StateError(f"{path}: a merge state already exists here")
        staging = _DiskStaging(path, metas, 0, _Scratch())
        for name, state in initial.items():
            staging.write(name, state)
        manifest = {**manifest, "state_file": staging.finish()}
        atomic_write_bytes(path / MANIFEST, _dump(manifest))
        return cls(path, manifest)

    @classmethod
    def open(cls, path: Path) -> DiskStore:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError as exc:
            raise StateError(f"{path}: no {MANIFEST}; not a contmerge state directory") from exc
        except ValueError as exc:
            raise StateError(f"{path}/{MANIFEST}: corrupt manifest ({exc})") from exc
        if manifest.get("format") != FORMAT:
            raise StateError(f"{path}: unknown state format {manifest.get('format')!r}")
        return cls(path, manifest)

    def _open_current(self) -> None:
        current = self.manifest["state_file"]
        # leftovers of a fold that crashed before its manifest was committed
        for entry in self.path.iterdir():
            stale = entry.name.startswith("state-") and entry.name != current
            if stale or (entry.name.startswith(".") and entry.name.endswith(".tmp")):
                entry.unlink()
        try:
            self._set_reader(SafetensorsReader(self.path / current))
        except CheckpointError as exc:
            raise StateError(f"{self.path}: state tensors unreadable ({exc})") from exc

    def _set_reader(self, reader: SafetensorsReader) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = reader
        self._slots: dict[str, dict[str, str]] = {}
        for key in reader.meta:
            name, slot = key.rsplit("::", 1)
            self._slots.setdefault(name, {})[slot] = key

    def read(self, name: str) -> State:
        assert self._reader is not None
        return {slot: self._reader.read(key) for slot, key in self._slots.get(name, {}).items()}

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

    def begin(self, metas: Mapping[str, TensorMeta]) -> _DiskStaging:
        spare = self.path / SPARE
        return _DiskStaging(
            self.path,
            metas,
            int(self.manifest["generation"]) + 1,
            self._scratch,
            reuse=spare if spare.exists() else None,
        )

    def commit(self, staging: _DiskStaging, manifest: dict[str, Any]) -> None:
        manifest = {**manifest, "state_file": staging.finish()}
        atomic_write_bytes(self.path / MANIFEST, _dump(manifest))
        old = self.manifest["state_file"]
        self.manifest = manifest
        self._set_reader(SafetensorsReader(self.path / manifest["state_file"]))
        # the old generation is no longer named by the manifest: the next fold overwrites it in
        # place, several times faster than writing a new file (no block allocation, no unlink)
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path / old, self.path / SPARE)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._lock.close()


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
    """A new generation being written: a temp file that becomes ``state-<gen>.safetensors``."""

    def __init__(
        self,
        directory: Path,
        metas: Mapping[str, TensorMeta],
        generation: int,
        scratch: _Scratch,
        reuse: Path | None = None,
    ) -> None:
        self.directory = directory
        self.final_name = f"state-{generation:08d}.safetensors"
        if reuse is not None:
            fd, self.tmp = os.open(reuse, os.O_WRONLY), str(reuse)
        else:
            fd, self.tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=directory)
        self._handle = os.fdopen(fd, "wb")
        self._metas = metas
        self._slots = _by_tensor(metas)
        self._scratch = scratch
        self._scratch.reset()
        self._pending: set[str] = set()
        self._writer = SafetensorsWriter(self._handle, metas, {"format": FORMAT})
        self._flusher = _EarlyWriteback(self._handle.fileno())

    def target(self, name: str) -> State:
        """Buffers for ``name``'s new state, valid until it is written."""
        self._pending.add(name)
        return self._scratch.carve(self._slots[name])

    def write(self, name: str, state: State) -> None:
        for slot, tensor in state.items():
            self._writer.write(slot_key(name, slot), tensor)
            self._flusher.wrote(tensor.numel() * tensor.element_size())
        self._pending.discard(name)
        if not self._pending:
            self._scratch.reset()

    def finish(self) -> str:
        self._writer.finish()
        self._handle.flush()
        os.ftruncate(self._handle.fileno(), self._handle.tell())  # a reused file may be longer
        self._flusher.close()
        os.fsync(self._handle.fileno())  # only what the early writeback has not yet done
        self._handle.close()
        os.replace(self.tmp, self.directory / self.final_name)
        fsync_dir(self.directory)
        return self.final_name

    def abort(self) -> None:
        """Give up this generation; its file stays as the spare the next fold overwrites."""
        self._flusher.close()
        self._handle.close()
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.tmp, self.directory / SPARE)


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


def _lock_directory(path: Path) -> IO[str]:
    """An exclusive lock on the directory, held while the returned file stays open."""
    handle = open(path / ".lock", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.close()
        raise StateError(f"{path}: another process is folding into this state") from exc
    return handle


def _dump(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=False).encode() + b"\n"
