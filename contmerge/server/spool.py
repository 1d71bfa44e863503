"""The upload spool: where an upload becomes durable before the client is told it was accepted.

An upload streams into ``spool/.<id>.tmp``; once complete it is fsync'd and renamed to
``spool/<id>__<name>.safetensors`` (then the directory is fsync'd). A directory sent as a tar
is unpacked into ``spool/.<id>.unpack/`` (every file fsync'd) and renamed to
``spool/<id>__<name>.dir``. Only an entry with its final name counts as accepted; ids start
with a zero-padded sequence number, so sorting the names gives the arrival order back after a
restart. The writer removes an entry once it is folded or rejected.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..atomic import fsync_dir

SPOOL_DIR = "spool"
SUFFIX = ".safetensors"
DIR_SUFFIX = ".dir"
MAX_NAME = 128
# a plain file name: no separators, no leading dot, no "..", nothing a shell or a log mangles
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._+-]{{0,{MAX_NAME - 1}}}")
_SPOOLED = re.compile(
    r"(?P<id>\d{8,}-[0-9a-f]{6})__(?P<name>.+)(?P<suffix>"
    + re.escape(SUFFIX)
    + "|"
    + re.escape(DIR_SUFFIX)
    + ")"
)


class BadName(ValueError):
    """A checkpoint name that could escape the spool or confuse a reader; refused, not fixed."""


def check_name(raw: str) -> str:
    if not raw:
        raise BadName("empty checkpoint name")
    if len(raw) > MAX_NAME:
        raise BadName(f"checkpoint name longer than {MAX_NAME} characters")
    if "/" in raw or "\\" in raw or ".." in raw or "\0" in raw:
        raise BadName(f"checkpoint name {raw!r} contains a path (/, \\ or ..): refused")
    if not _NAME.fullmatch(raw):
        raise BadName(
            f"checkpoint name {raw!r} must start with a letter or digit and use only "
            "letters, digits and . _ + -"
        )
    return raw


def id_sequence(checkpoint_id: str) -> int:
    head = checkpoint_id.split("-", 1)[0]
    return int(head) if head.isdigit() else 0


@dataclass(frozen=True)
class Spooled:
    id: str
    name: str
    path: Path


class Spool:
    def __init__(self, directory: Path, first_sequence: int = 1) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        # temp files and unpacking of uploads cut short by a crash were never acknowledged
        for entry in directory.iterdir():
            if entry.name.startswith(".") and entry.name.endswith((".tmp", ".unpack")):
                self.discard(entry)
        self._lock = threading.Lock()
        pending = self.pending()
        self._next = max([first_sequence, *(id_sequence(s.id) + 1 for s in pending)])

    def continue_after(self, sequence: int) -> None:
        """Never reuse an id the journal has seen (ids label arrivals in the manifest)."""
        with self._lock:
            self._next = max(self._next, sequence + 1)

    def new_id(self) -> str:
        with self._lock:
            sequence, self._next = self._next, self._next + 1
        return f"{sequence:08d}-{secrets.token_hex(3)}"

    def open_temp(self, checkpoint_id: str) -> tuple[Path, BinaryIO]:
        path = self.directory / f".{checkpoint_id}.tmp"
        return path, open(path, "xb")

    def commit(self, temp: Path, handle: BinaryIO, checkpoint_id: str, name: str) -> Path:
        """Make the upload durable under its final name (fsync file, rename, fsync dir)."""
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        final = self.directory / f"{checkpoint_id}__{name}{SUFFIX}"
        os.replace(temp, final)
        fsync_dir(self.directory)
        return final

    def unpack_dir(self, checkpoint_id: str) -> Path:
        """Where a tar upload is unpacked before it counts as accepted (must not exist yet)."""
        return self.directory / f".{checkpoint_id}.unpack"

    def commit_dir(self, root: Path, checkpoint_id: str, name: str) -> Path:
        """Make an unpacked directory (its files already fsync'd) the accepted upload."""
        final = self.directory / f"{checkpoint_id}__{name}{DIR_SUFFIX}"
        os.replace(root, final)
        fsync_dir(self.directory)
        self.discard(self.unpack_dir(checkpoint_id))  # what is left when root was a subfolder
        return final

    def discard(self, path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            return
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def pending(self) -> list[Spooled]:
        """Accepted uploads not yet folded or rejected, in arrival order."""
        found = []
        for entry in self.directory.iterdir():
            match = _SPOOLED.fullmatch(entry.name)
            if match and (entry.is_dir() if match["suffix"] == DIR_SUFFIX else entry.is_file()):
                found.append(Spooled(match["id"], match["name"], entry))
        return sorted(found, key=lambda s: (id_sequence(s.id), s.id))


def spooled_bytes(path: Path) -> int:
    """The size of a spooled upload: a file, or the files of an unpacked directory."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size
