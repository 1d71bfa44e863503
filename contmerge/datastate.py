"""The durable state of a data-informed merge (FW-Merging's pool, DIMAT's per-agent fold).

A directory holds ``datastate.json`` (what kind of merge, its settings, every arrival with its
content hash and file identity, counters, a log) and the tensors it points to, one
``tensors-<generation>.safetensors`` per commit. A commit writes the new tensors file (temp
file, fsync, rename), then the manifest the same way, then removes the tensors no manifest
names: a crash at any point leaves the last committed manifest and its tensors, loadable. The
directory is locked as the other states are (:mod:`contmerge.dirlock`): one writer, shared
readers.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import atomic_open, atomic_write_bytes
from .dirlock import DirectoryLock
from .errors import CheckpointError, StateError
from .identity import file_identity

if TYPE_CHECKING:  # torch is imported when tensors are read or written, not by the CLI's check
    import torch

MANIFEST = "datastate.json"
FORMAT = 1
KINDS = ("fw", "dimat")


@dataclass
class ArrivalResult:
    """What a fold did with one arrival: joined (FW's pool), anchor, folded (DIMAT) or
    duplicate (its content hash is already in the state, as #index)."""

    status: str
    source: str
    hash: str
    index: int


def is_data_state(directory: str | Path) -> bool:
    """A directory holding a data-informed merge state (not a ``Merger`` state)."""
    return (Path(directory) / MANIFEST).is_file()


def tensors_name(generation: int) -> str:
    return f"tensors-{generation:08d}.safetensors"


def checkpoint_hash(source: str | Path) -> str:
    """Content hash of a checkpoint, one tensor in memory at a time (names in sorted order)."""
    from .hashing import ContentHash
    from .sources import open_checkpoint

    content = ContentHash()
    with open_checkpoint(source) as ckpt:
        for name in sorted(ckpt.meta):
            content.add_tensor(name, ckpt.read(name).contiguous())
    return content.hexdigest()


class DataState:
    """One state directory: its lock, its manifest, and atomic commits of (manifest, tensors)."""

    def __init__(self, directory: str | Path, *, read_only: bool = False) -> None:
        self.directory = Path(directory)
        self.read_only = read_only
        if read_only and not self.directory.is_dir():
            raise StateError(f"{self.directory}: no such state directory")
        self.lock = (
            DirectoryLock.shared(self.directory)
            if read_only
            else DirectoryLock.exclusive(self.directory)
        )
        try:
            self.manifest: dict[str, Any] | None = read_data_manifest(self.directory)
        except BaseException:
            self.lock.close()
            raise

    @property
    def exists(self) -> bool:
        return self.manifest is not None

    def existing(self, kind: str) -> dict[str, Any] | None:
        """The manifest of a ``kind`` state; None for a new one (refused when read-only)."""
        if self.manifest is None and not self.read_only:
            return None
        return self.check_kind(kind)

    def check_kind(self, kind: str) -> dict[str, Any]:
        if self.manifest is None:
            raise StateError(f"{self.directory}: no {MANIFEST}; not a {kind} state")
        if self.manifest["kind"] != kind:
            raise StateError(f"{self.directory}: a {self.manifest['kind']} state, not a {kind} one")
        return self.manifest

    def tensors(self) -> dict[str, torch.Tensor] | None:
        """The tensors of the committed generation (None before the first)."""
        if self.manifest is None or self.manifest.get("tensors") is None:
            return None
        from safetensors.torch import load_file

        path = self.directory / self.manifest["tensors"]
        try:
            return dict(load_file(str(path)))
        except (OSError, ValueError, RuntimeError) as exc:  # safetensors raises its own errors
            raise StateError(f"{path}: cannot read the state's tensors: {exc}") from exc

    def commit(
        self, manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, Any]:
        """Write ``tensors`` (if given) and ``manifest`` as the next generation, durably."""
        if self.read_only:
            raise StateError(f"{self.directory}: opened read-only")
        self.lock.check_held()
        previous = self.manifest or {}
        generation = int(previous.get("generation", -1)) + 1
        record = {**manifest, "format": FORMAT, "generation": generation}
        record.setdefault("tensors", previous.get("tensors"))
        if tensors is not None:
            from .tensorfile import write_safetensors

            record["tensors"] = tensors_name(generation)
            with atomic_open(self.directory / record["tensors"]) as handle:
                write_safetensors(handle, dict(tensors), {"format": "pt"})
        atomic_write_bytes(
            self.directory / MANIFEST, (json.dumps(record, indent=1) + "\n").encode()
        )
        self.manifest = record
        self._remove_stale(record.get("tensors"))
        return record

    def _remove_stale(self, keep: str | None) -> None:
        for path in self.directory.glob("tensors-*.safetensors"):
            if path.name != keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def close(self) -> None:
        self.lock.close()

    def __enter__(self) -> DataState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_data_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest, checked for its kind and format; None where there is none yet."""
    path = directory / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise StateError(f"{path}: corrupt (not JSON: {exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("kind") not in KINDS:
        raise StateError(f"{path}: corrupt (no kind among {KINDS})")
    if manifest.get("format") != FORMAT:
        raise StateError(f"{path}: format {manifest.get('format')!r}, this version reads {FORMAT}")
    return manifest


def arrival_record(source: str | Path, label: str | None = None) -> dict[str, Any]:
    """What a state records of an arrival: where it was, its content hash, its file identity."""
    return {
        "source": str(label or source),
        "path": os.path.abspath(source),
        "hash": checkpoint_hash(source),
        "file": file_identity(Path(source)),
    }


def keep_copy(directory: Path, source: str | Path, content_hash: str) -> Path:
    """A copy of an arrival inside the state (``pool/<hash>.safetensors``), for arrivals whose
    file goes away after the fold (the server's spool and inbox)."""
    import shutil

    target = directory / "pool" / f"{content_hash[:32]}.safetensors"
    if not target.exists():
        with open(source, "rb") as src, atomic_open(target) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return target


def check_unchanged(record: Mapping[str, Any]) -> None:
    """A pool file must still hold what joined: same identity, or else the same content."""
    path = Path(record["path"])
    if not path.exists():
        raise CheckpointError(record["path"], "joined this state but is gone (restore it)")
    if record.get("file") is not None and file_identity(path) == record["file"]:
        return
    if checkpoint_hash(path) != record["hash"]:
        raise CheckpointError(
            record["path"], "changed since it joined this state (its content hash differs)"
        )
