"""A checkpoint directory (PEFT adapter, sharded or model directory) uploaded as a tar.

Nothing in the archive is trusted. Every member is checked before anything is written: a plain
relative path (no absolute path, no ``..``), a regular file or a directory (no links, devices,
FIFOs, sparse files), each name once, at most ``max_members`` of them and at most ``max_bytes``
unpacked in all. Files are then written by this code, not by ``tarfile.extract``: created
exclusively, never through a link, fsync'd. A tar of the directory's contents and a tar of the
directory itself (``tar -cf run.tar run/``: one top folder) both work.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..atomic import fsync_dir

COPY_BLOCK = 1 << 20
MAX_DEPTH = 16
PLAIN_TAR = "a plain (uncompressed) tar is expected, e.g. tar -cf adapter.tar -C adapter ."


class TarRefused(Exception):
    """The archive is refused; ``status_code`` is 413 for a limit, else 422."""

    def __init__(self, reason: str, status_code: int = 422) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status_code = status_code


@dataclass(frozen=True)
class TarLimits:
    max_bytes: int
    max_members: int


def _shown(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:80] + "…")


def member_path(raw: str) -> PurePosixPath:
    """The relative path a member may be unpacked to; TarRefused if it could leave the target."""
    if "\0" in raw:
        raise TarRefused(f"member {_shown(raw)} has a NUL byte in its name")
    if raw.startswith("/"):
        raise TarRefused(f"member {_shown(raw)} has an absolute path")
    parts = [part for part in raw.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise TarRefused(f"member {_shown(raw)} has a '..' in its path")
    if len(parts) > MAX_DEPTH:
        raise TarRefused(f"member {_shown(raw)} is nested deeper than {MAX_DEPTH} folders")
    return PurePosixPath(*parts)


def _kind_refused(member: tarfile.TarInfo) -> str | None:
    if member.issym():
        return "is a symbolic link"
    if member.islnk():
        return "is a hard link"
    if member.ischr() or member.isblk():
        return "is a device"
    if member.isfifo():
        return "is a FIFO"
    if member.issparse():
        return "is a sparse file"
    if not (member.isreg() or member.isdir()):
        return "is not a regular file"
    return None


def _survey(
    tar: tarfile.TarFile, limits: TarLimits
) -> tuple[set[PurePosixPath], dict[PurePosixPath, tarfile.TarInfo]]:
    """Check every member's header; the directories and files to create."""
    directories: set[PurePosixPath] = set()
    files: dict[PurePosixPath, tarfile.TarInfo] = {}
    total = count = 0
    while True:
        try:
            member = tar.next()
        except (tarfile.TarError, EOFError) as exc:
            raise TarRefused(f"malformed tar archive: {exc}") from exc
        if member is None:
            break
        count += 1
        if count > limits.max_members:
            raise TarRefused(
                f"the tar has more than {limits.max_members} members (--max-tar-members)", 413
            )
        path = member_path(member.name)
        refused = _kind_refused(member)
        if refused:
            raise TarRefused(
                f"member {_shown(member.name)} {refused}: only regular files and directories "
                "are accepted"
            )
        if path in files or (member.isreg() and path in directories):
            raise TarRefused(f"member {_shown(member.name)} appears twice")
        if member.isdir():
            directories.add(path)
            continue
        total += member.size
        if total > limits.max_bytes:
            raise TarRefused(
                f"the tar unpacked is over the limit of {limits.max_bytes} bytes "
                "(--max-upload-bytes)",
                413,
            )
        files[path] = member
    for path in files:
        clash = next((p for p in path.parents if p in files), None)
        if clash is not None:
            raise TarRefused(f"{_shown(str(clash))} is both a file and a folder in the tar")
    return directories, files


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> None:
    source = tar.extractfile(member)
    assert source is not None  # a regular file, checked by _survey
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        left = member.size
        try:
            while left > 0:
                block = source.read(min(COPY_BLOCK, left))
                if not block:
                    raise TarRefused(f"the tar is truncated inside {_shown(member.name)}")
                out.write(block)
                left -= len(block)
        except tarfile.TarError as exc:
            raise TarRefused(f"the tar is truncated inside {_shown(member.name)}: {exc}") from exc
        out.flush()
        os.fsync(out.fileno())


def unpack(archive: Path, target: Path, limits: TarLimits) -> Path:
    """Unpack ``archive`` into the new directory ``target``; the checkpoint's root (``target``,
    or its only folder when everything sits under one). Raises TarRefused, or OSError when the
    server's disk fails (the caller cleans ``target`` either way)."""
    try:
        tar = tarfile.open(archive, mode="r:")
    except (tarfile.TarError, EOFError) as exc:
        raise TarRefused(f"not a tar archive ({PLAIN_TAR})") from exc
    with tar:
        directories, files = _survey(tar, limits)
        target.mkdir()
        made = {target}
        for relative in sorted(directories | {p.parent for p in files}):
            folder = target.joinpath(relative)
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        for relative, member in sorted(files.items()):
            _write_member(tar, member, target.joinpath(relative))
    for folder in sorted(made, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(folder)
    entries = list(target.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return target
