"""The watched inbox: a directory where a training job (or anyone) drops checkpoints.

Polling, no dependency. An entry is taken only when it is complete and settled:

- a file that was renamed into place; dotfiles, ``*.tmp`` and ``*.partial`` are being written
  and are ignored;
- a directory: a sharded checkpoint once its ``model.safetensors.index.json`` and every shard it
  lists are there; a model or LoRA adapter directory once its weights file is there (what
  ``sources.recognise`` tells every door; a directory it refuses for another reason, such as
  two kinds in one, goes to the fold once settled, which refuses it with that reason);
- and in both cases looking the same (sizes, mtimes) on two scans in a row, which also covers a
  writer that does not rename.

Once the writer is done, the entry moves to ``done/`` or ``rejected/`` (with
``<name>.reason.txt`` beside it). Entries stay in place until then, so a restart finds them again.

Some entries are rejected as they are, never folded nor waited on: a symbolic link that leads
out of the inbox (a link whose target stays inside it is followed), a directory holding one, a
shard index naming a file outside its directory, and a file whose first 8 bytes cannot be a
safetensors header (checked once it has settled; the reason never quotes those bytes).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..sources import (
    SAFETENSORS_INDEX,
    Incomplete,
    ShardPathError,
    read_as_safetensors,
    recognise,
    sidecar_name,
)
from ..tensorfile import DEFAULT_MAX_HEADER_BYTES
from .headercheck import PREFIX_BYTES, header_problem

log = logging.getLogger("contmerge.server")
DONE, REJECTED = "done", "rejected"
IGNORED_SUFFIXES = (".tmp", ".partial")

Signature = list[Any]  # JSON-friendly, so the journal can remember it across restarts


@dataclass(frozen=True)
class InboxEntry:
    name: str
    path: Path
    signature: Signature
    sidecars: tuple[Path, ...]  # per-checkpoint statistics files that travel with it
    refused: str | None = None  # why it is rejected as it is, without a fold


class Refused(Exception):
    """An entry to reject as it is: waiting would not help, folding must not happen."""


def _inside(path: Path, root: Path) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base + os.sep)


def check_link(path: Path, root: Path, shown: str) -> None:
    """Refuse a symbolic link that leads out of ``root`` (one that stays inside is fine)."""
    if path.is_symlink() and not _inside(path, root):
        raise Refused(
            f"{shown} is a symbolic link to outside the inbox: refused (put the checkpoint "
            "itself in the inbox)"
        )


def header_refusal(path: Path, limit: int) -> str | None:
    """Why the safetensors header of a settled file will not be read, or None."""
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(PREFIX_BYTES)
            size = os.fstat(handle.fileno()).st_size
    except OSError:
        return None  # gone or unreadable: the fold says why
    problem = header_problem(prefix, size, limit)
    return None if problem is None else problem[1]


def lstat_signature(path: Path) -> Signature:
    stat = path.lstat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def is_ignored(name: str) -> bool:
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES) or name in (DONE, REJECTED)


def sidecar_names(name: str, kinds: Sequence[str]) -> list[str]:
    """The statistics files that travel with checkpoint ``name`` (``sources.sidecar_name``)."""
    return [sidecar_name(name, kind) for kind in kinds]


def inspect_entry(
    path: Path, root: Path, max_header_bytes: int | None = None
) -> tuple[Signature | None, str | None]:
    """(signature, None) when the entry looks complete, else (None, what it still lacks).

    Raises Refused for an entry to reject as it is; ``root`` is the directory links must stay in;
    ``max_header_bytes`` bounds a shard index as it bounds the fold's (default: the CLI's).
    """
    check_link(path, root, path.name)
    try:
        if path.is_file():
            stat = path.stat()
            return [stat.st_size, stat.st_mtime_ns, stat.st_ino], None
        if not path.is_dir():
            return None, "not a file or directory"
        children = sorted(path.iterdir())
        for child in children:
            check_link(child, root, f"{path.name}/{child.name}")
        listing = [[c.name, *_size_and_mtime(c, path.name)] for c in children]
    except FileNotFoundError:
        return None, "vanished"
    try:
        # what a checkpoint directory looks like is the CLI's rule (sources.recognise), so that
        # both doors take and refuse the same directories
        recognise(path, max_header_bytes)
    except ShardPathError as exc:
        raise Refused(f"{SAFETENSORS_INDEX}: {exc.reason}: refused") from None
    except Incomplete as exc:
        return None, _still_lacking(exc, path)
    except CheckpointError:
        pass  # settled yet unreadable: the fold will say why
    return listing, None


def _still_lacking(exc: Incomplete, path: Path) -> str:
    """The reason an incomplete directory waits, naming a file in it relative to it (the
    inbox's status is shown to clients, who need not see the server's paths)."""
    missing = Path(exc.source)
    if missing == path or not missing.is_relative_to(path):
        return exc.reason
    return f"{exc.reason}: {missing.relative_to(path)}"


def _size_and_mtime(child: Path, parent: str) -> list[int]:
    """What a directory entry's signature records of ``child``; Refused for a symlink loop,
    which no wait resolves (and whose error must not end the whole scan)."""
    try:
        stat = child.stat()
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise Refused(f"{parent}/{child.name} is a symbolic link loop: refused") from None
    return [stat.st_size, stat.st_mtime_ns]


def header_refusal_in(path: Path, limit: int) -> str | None:
    """The first header refusal among an entry's safetensors files: the entry itself, or the
    ``*.safetensors`` files of a directory (which also holds configs, READMEs...)."""
    if not path.is_dir():
        return header_refusal(path, limit) if read_as_safetensors(path.name) else None
    for file in sorted(path.iterdir()):
        if file.name.endswith(".safetensors") and file.is_file():
            problem = header_refusal(file, limit)
            if problem is not None:
                return f"{file.name}: {problem}"
    return None


class InboxWatcher(threading.Thread):
    def __init__(
        self,
        directory: Path,
        submit: Callable[[InboxEntry], bool],
        poll_interval: float = 1.0,
        sidecar_kinds: Sequence[str] = (),
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    ) -> None:
        super().__init__(name="contmerge-inbox", daemon=True)
        self.directory = directory
        self.done_dir = directory / DONE
        self.rejected_dir = directory / REJECTED
        for folder in (directory, self.done_dir, self.rejected_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.submit = submit
        self.poll_interval = poll_interval
        self.sidecar_kinds = tuple(sidecar_kinds)
        self.max_header_bytes = max_header_bytes
        self.scans = 0
        self.waiting: dict[str, str] = {}
        self._seen: dict[str, Signature] = {}
        self._claimed: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.scan()
            except OSError:
                log.exception("inbox scan of %s failed", self.directory)
            self._stopping.wait(self.poll_interval)

    def _candidates(self) -> list[Path]:
        # statistics files travel with their checkpoint; they are not checkpoints of their own
        sidecars = {f".{kind}.safetensors" for kind in self.sidecar_kinds}
        found = []
        for entry in os.scandir(self.directory):
            if is_ignored(entry.name) or any(entry.name.endswith(s) for s in sidecars):
                continue
            try:
                # a rename updates ctime, not mtime: ctime orders entries by arrival; a link's
                # own, so that a dangling one is seen (and refused) too
                stat = entry.stat(follow_symlinks=False)
                found.append((stat.st_ctime_ns, entry.name, Path(entry.path)))
            except FileNotFoundError:
                continue
        return [path for _, _, path in sorted(found)]

    def scan(self) -> None:
        waiting: dict[str, str] = {}
        present: set[str] = set()
        blocked = False  # once the queue is full, later entries wait: arrival order is kept
        for path in self._candidates():
            name = path.name
            present.add(name)
            with self._lock:
                if name in self._claimed:
                    continue
            try:
                signature, why = inspect_entry(path, self.directory, self.max_header_bytes)
            except Refused as exc:
                refused: str | None = str(exc)
                signature, why = lstat_signature(path), None
            else:
                refused = None
                if signature is None:
                    self._seen.pop(name, None)
                    waiting[name] = why or "incomplete"
                    continue
                if self._seen.get(name) != signature:
                    self._seen[name] = signature
                    waiting[name] = "settling"
                    continue
            if blocked:
                waiting[name] = "queue full"
                continue
            sidecars = tuple(
                path.with_name(s)
                for s in sidecar_names(name, self.sidecar_kinds)
                if os.path.lexists(path.with_name(s))
            )
            if refused is None:
                refused = self._refusal(path, sidecars)
            with self._lock:
                self._claimed.add(name)
            if not self.submit(InboxEntry(name, path, signature, sidecars, refused)):
                with self._lock:
                    self._claimed.discard(name)
                waiting[name] = "queue full"
                blocked = True
                continue
            self._seen.pop(name, None)
        for name in set(self._seen) - present:
            del self._seen[name]
        self.waiting = waiting  # replaced whole, so readers on other threads see one scan
        self.scans += 1

    def _refusal(self, path: Path, sidecars: Sequence[Path]) -> str | None:
        """Checks of a settled entry: its sidecars' links, its safetensors headers."""
        try:
            for sidecar in sidecars:
                check_link(sidecar, self.directory, sidecar.name)
        except Refused as exc:
            return str(exc)
        try:
            return header_refusal_in(path, self.max_header_bytes)
        except OSError:
            return None  # vanished or unreadable: the fold says why

    def settle(self, entry: InboxEntry, checkpoint_id: str, event: str, reason: str | None) -> None:
        """Move a finished entry (and its sidecars) to done/ or rejected/."""
        folder = self.rejected_dir if event == "rejected" else self.done_dir
        target = entry.name
        if os.path.lexists(folder / target) or any(
            os.path.lexists(folder / s.name) for s in entry.sidecars
        ):
            target = f"{checkpoint_id}-{entry.name}"  # never overwrite an earlier one
        try:
            if os.path.lexists(entry.path):  # a refused link moves as the link itself
                os.replace(entry.path, folder / target)
            for sidecar in entry.sidecars:
                prefix = target[: len(target) - len(entry.name)]
                os.replace(sidecar, folder / f"{prefix}{sidecar.name}")
            if event == "rejected":
                (folder / f"{target}.reason.txt").write_text(f"{reason}\n")
        finally:
            with self._lock:
                self._claimed.discard(entry.name)
