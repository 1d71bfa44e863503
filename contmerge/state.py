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
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from .atomic import atomic_write_bytes, fsync_dir
from .errors import CheckpointError, StateError
from .strategy import State
from .tensorfile import SafetensorsReader, SafetensorsWriter, TensorMeta

MANIFEST = "manifest.json"
FORMAT = "contmerge-state/1"


def slot_key(name: str, slot: str) -> str:
    return f"{name}::{slot}"


class MemoryStore:
    """State tensors in a dict; nothing survives the process."""

    def __init__(self, manifest: dict[str, Any], tensors: dict[str, State]) -> None:
        self.manifest = manifest
        self._tensors = tensors
        self.path: Path | None = None

    def read(self, name: str) -> State:
        return self._tensors.get(name, {})

    def begin(self, metas: Mapping[str, TensorMeta]) -> _MemoryStaging:
        return _MemoryStaging()

    def commit(self, staging: _MemoryStaging, manifest: dict[str, Any]) -> None:
        self._tensors = staging.tensors
        self.manifest = manifest

    def close(self) -> None:
        pass


class _MemoryStaging:
    def __init__(self) -> None:
        self.tensors: dict[str, State] = {}

    def write(self, name: str, state: State) -> None:
        self.tensors[name] = state

    def abort(self) -> None:
        self.tensors = {}


class DiskStore:
    """State tensors in a directory, read lazily one tensor at a time, committed atomically."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self._lock = _lock_directory(path)
        self._reader: SafetensorsReader | None = None
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
        staging = _DiskStaging(path, metas, generation=0)
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

    def begin(self, metas: Mapping[str, TensorMeta]) -> _DiskStaging:
        return _DiskStaging(self.path, metas, generation=int(self.manifest["generation"]) + 1)

    def commit(self, staging: _DiskStaging, manifest: dict[str, Any]) -> None:
        manifest = {**manifest, "state_file": staging.finish()}
        atomic_write_bytes(self.path / MANIFEST, _dump(manifest))
        old = self.manifest["state_file"]
        self.manifest = manifest
        self._set_reader(SafetensorsReader(self.path / manifest["state_file"]))
        with contextlib.suppress(FileNotFoundError):
            (self.path / old).unlink()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._lock.close()


class _DiskStaging:
    """A new generation being written: a temp file that becomes ``state-<gen>.safetensors``."""

    def __init__(self, directory: Path, metas: Mapping[str, TensorMeta], generation: int) -> None:
        self.directory = directory
        self.final_name = f"state-{generation:08d}.safetensors"
        fd, self.tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=directory)
        self._handle = os.fdopen(fd, "wb")
        self._metas = metas
        self._writer = SafetensorsWriter(self._handle, metas, {"format": FORMAT})

    def write(self, name: str, state: State) -> None:
        for slot, tensor in state.items():
            self._writer.write(slot_key(name, slot), tensor)

    def finish(self) -> str:
        self._writer.finish()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self.tmp, self.directory / self.final_name)
        fsync_dir(self.directory)
        return self.final_name

    def abort(self) -> None:
        self._handle.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


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
