"""Atomic file replacement: write to a temporary file, fsync it, rename it over the target.

A crash at any point leaves either the old file or the new one, never a torn mix. A write that
fails (disk full, quota, I/O error) raises ``StorageError`` naming the file being written, and
the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import StorageError


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an ``OSError`` raised inside into a ``StorageError`` naming ``path``."""
    try:
        yield
    except OSError as exc:
        raise StorageError.of(exc, path) from exc


class NamedWrites:
    """A binary file whose write failures name the file the user knows (not a temp name)."""

    def __init__(self, handle: BinaryIO, name: str | os.PathLike[str]) -> None:
        self._handle, self.name = handle, name

    def write(self, data: Any) -> int:
        with writing(self.name):
            return self._handle.write(data)

    def flush(self) -> None:
        with writing(self.name):
            self._handle.flush()

    def sync(self) -> None:
        """Flush and fsync: the data is on the device (or the failure is reported)."""
        with writing(self.name):
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def fileno(self) -> int:
        return self._handle.fileno()

    def tell(self) -> int:
        return self._handle.tell()

    def close(self) -> None:
        with writing(self.name):
            self._handle.close()

    def abandon(self) -> None:
        """Close after a failure: what could not be flushed is lost anyway."""
        with contextlib.suppress(OSError):
            self._handle.close()


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; on clean exit it replaces ``path`` durably."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    handle = NamedWrites(os.fdopen(fd, "wb"), path)
    try:
        yield handle  # type: ignore[misc]  # what writers use of a binary file
        handle.sync()
        handle.close()
        with writing(path):
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except BaseException:
        handle.abandon()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path) as handle:
        handle.write(data)
