"""The lock of a state directory: an ``flock`` on ``<dir>/.lock``.

Writers hold it exclusively for as long as they have the state open, readers (emit, inspect,
verify) share it, so a reader never sees a generation's file reused under it. A reader creates
nothing: where ``.lock`` is missing or cannot be opened (a read-only or archived state) it reads
without a lock. Deleting ``.lock`` would let a second writer take a lock of its own, so a writer
checks before each commit that the file it locked is still the one at ``<dir>/.lock``.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from .errors import StateError

LOCK = ".lock"
BUSY = "another process is folding into this state"


class DirectoryLock:
    """An exclusive or shared lock on a state directory; ``None`` handle: read unlocked."""

    def __init__(self, directory: Path, fd: int | None, exclusive: bool) -> None:
        self.directory, self._fd, self.exclusive = directory, fd, exclusive

    @classmethod
    def exclusive(cls, directory: Path) -> DirectoryLock:
        """Take the writer's lock, creating the directory and its lock file as needed."""
        path = directory / LOCK
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except IsADirectoryError as exc:
            raise _not_a_file(path) from exc
        except OSError as exc:
            raise StateError(
                f"{path}: cannot open the lock for writing ({exc.strerror}): no fold can be made "
                "here; emit, inspect and verify still read this state"
            ) from exc
        return cls._locked(directory, fd, fcntl.LOCK_EX)

    @classmethod
    def shared(cls, directory: Path) -> DirectoryLock:
        """Take a reader's lock if ``.lock`` can be opened; never create anything."""
        path = directory / LOCK
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, PermissionError):
            return cls(directory, None, False)
        except OSError as exc:
            raise StateError(f"{path}: cannot open the lock: {exc.strerror}") from exc
        return cls._locked(directory, fd, fcntl.LOCK_SH)

    @classmethod
    def _locked(cls, directory: Path, fd: int, how: int) -> DirectoryLock:
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _not_a_file(directory / LOCK)
            fcntl.flock(fd, how | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise StateError(f"{directory}: {BUSY}") from exc
        except BaseException:
            os.close(fd)
            raise
        return cls(directory, fd, how == fcntl.LOCK_EX)

    def check_held(self) -> None:
        """Raise unless the file this lock holds is still ``<dir>/.lock`` (not deleted or
        replaced, which would let another writer lock a file of its own)."""
        if self._fd is None:
            raise StateError(f"{self.directory}: not locked")
        held = os.fstat(self._fd)
        try:
            current = os.stat(self.directory / LOCK)
        except OSError:
            current = None
        if current is None or (current.st_dev, current.st_ino) != (held.st_dev, held.st_ino):
            raise StateError(
                f"{self.directory}: the lock file was deleted or replaced while this process "
                "held it, so another process may be folding into this state; refusing to commit "
                "(nothing was changed; open the state again)"
            )

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None


def _not_a_file(path: Path) -> StateError:
    return StateError(f"{path} is not a regular file (remove it; it is the state's lock)")
