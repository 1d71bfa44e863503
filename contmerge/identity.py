"""Who a file is, from the file system alone: path, size, mtime and inode (plus, for the base,
the bytes of each safetensors header). Recognising an unchanged file this way reads none of its
tensors: a checkpoint folded before is skipped, and a multi-GB base is not re-read to learn that
it is the state's base. Torch-free, so the command line can answer a no-op without importing it.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any

#: a header longer than this is not hashed into an identity (the reader's own bound refuses it)
_MAX_HASHED_HEADER = 64 << 20


def file_identity(source: Any) -> str | None:
    """Path, size, mtime and inode of a checkpoint file (or of each file of a directory): the
    same file, unchanged since it was folded, needs no reading to be recognised."""
    listed = _stats(source)
    if listed is None:
        return None
    path, stats = listed
    parts = [f"{n}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}" for n, _, st in stats]
    return hashlib.sha256("\0".join([str(path), *parts]).encode()).hexdigest()


def base_identity(source: Any) -> str | None:
    """``file_identity`` of the base's files (a sharded index's directory: every shard) and a hash
    of each safetensors header: names, dtypes, shapes and offsets of every tensor."""
    listed = _stats(source, shards_beside_index=True)
    if listed is None:
        return None
    path, stats = listed
    digest = hashlib.sha256(str(path).encode())
    try:
        for name, entry, st in stats:
            digest.update(f"\0{name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode())
            if name.endswith(".safetensors"):
                digest.update(_header_bytes(entry))
    except OSError:
        return None
    return digest.hexdigest()


def _stats(source: Any, shards_beside_index: bool = False) -> tuple[Path, list[Any]] | None:
    if not isinstance(source, (str, Path)):
        return None
    try:
        path = Path(source).resolve()  # RuntimeError: a symlink loop (before Python 3.13)
        listed = path if path.is_dir() else path.parent
        if path.is_dir() or (shards_beside_index and path.name.endswith(".index.json")):
            entries = sorted(listed.iterdir())
        else:
            entries = [path]
        stats = [(e.name, e, e.stat()) for e in entries if e.is_file()]
    except (OSError, RuntimeError):
        return None
    return path, stats


def _header_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return head
        (length,) = struct.unpack("<Q", head)
        return head + handle.read(min(length, _MAX_HASHED_HEADER))
