"""Errors that name what was wrong: the file, the tensor and the reason."""

from __future__ import annotations

import errno
import os

#: names longer than this are cut in messages (a hostile header may hold a megabyte-long one)
MAX_QUOTED = 120


def clip(text: str, limit: int = MAX_QUOTED) -> str:
    """``text`` cut to ``limit`` characters, for quoting untrusted names and values."""
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


class ContmergeError(Exception):
    """Base class of every error contmerge raises on purpose."""


class CheckpointError(ContmergeError, ValueError):
    """A checkpoint could not be read or does not fit the base; nothing was merged."""

    def __init__(self, source: str, reason: str, tensor: str | None = None) -> None:
        self.source = str(source)
        self.tensor = tensor
        self.reason = reason
        # repr: a tensor name from a hostile header may hold newlines or terminal escapes
        where = f"{self.source}" + (f", tensor {clip(tensor)!r}" if tensor is not None else "")
        super().__init__(f"{where}: {reason}")


class StateError(ContmergeError):
    """The merge state directory is missing, corrupt, or belongs to another setup."""


class StrategyError(ContmergeError, ValueError):
    """A strategy name or setting that does not resolve."""


class Notice(UserWarning):
    """Something the user should know that is not an error (e.g. a data set is missing, so a
    fallback is used); the CLI shows it as one ``note:`` line."""


class SettingError(ContmergeError, ValueError):
    """A setting given by the user (an option, an environment variable) that does not parse."""


#: plain words for the write failures a user can do something about
_WRITE_FAILURES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit exceeded",
    errno.EROFS: "read-only file system",
}


class StorageError(OSError):
    """Writing a file failed for a reason that is not the input's fault (disk full, quota, an
    I/O error, a read-only file system); what was committed before is intact. An ``OSError``
    with ``errno`` and ``filename`` set, so callers that retry I/O trouble catch it, and not a
    ``ContmergeError``, so it is never mistaken for a bad checkpoint."""

    @classmethod
    def of(cls, exc: OSError, path: str | os.PathLike[str]) -> StorageError:
        if isinstance(exc, StorageError):
            return exc
        return cls(exc.errno, exc.strerror, os.fspath(path))

    def __str__(self) -> str:
        reason = _WRITE_FAILURES.get(self.errno or 0) or (self.strerror or "I/O error").lower()
        return f"{reason} while writing {self.filename}"
