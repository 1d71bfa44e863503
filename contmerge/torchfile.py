"""Loading a ``torch.save`` file without trusting it.

``torch.load(weights_only=True)`` runs no pickle code, and ``mmap=True`` keeps the tensors on
disk until read. But a memory-mapped load takes each tensor's bytes at its zip record's offset
without checking the record: a record stored compressed (torch.save never compresses; a zip
bomb would) or shorter than the tensor is read as garbage weights, silently. So the archive is
first loaded on the meta device (no data, but each storage's offset in the file), and every
storage is matched to an uncompressed record of exactly its size before the real load.
"""

from __future__ import annotations

import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import CheckpointError, clip

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``; CheckpointError naming it (and a tensor) if it is not one."""
    if not path.is_file():  # torch.load of a FIFO would wait for a writer forever
        raise CheckpointError(str(path), "not a regular file")
    if path.stat().st_size == 0:
        raise CheckpointError(str(path), "empty file")
    zipped = zipfile.is_zipfile(path)
    if zipped:
        _check_records(path, _load(path, map_location="meta"))
    # mmap keeps tensors on disk until read; it needs the zip format of torch >= 1.6
    tensors = _state_dict(path, _load(path, map_location="cpu", mmap=zipped))
    return tensors


def _load(path: Path, **how: object) -> object:
    try:
        return torch.load(path, weights_only=True, **how)
    except Exception as exc:  # torch raises many kinds (e.g. AttributeError for f8 legacy)
        raise CheckpointError(str(path), _load_failure(path, exc)) from exc


def _state_dict(path: Path, loaded: object) -> dict[str, torch.Tensor]:
    tensors = _unwrap_state_dict(loaded)
    if tensors is None:
        raise CheckpointError(str(path), "does not hold a state dict of tensors")
    return tensors


def _check_records(path: Path, on_meta: object) -> None:
    """Every tensor's storage is an uncompressed record of exactly its size."""
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
            records = {}
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(
                        str(path),
                        f"zip record {clip(info.filename, 60)!r} is compressed: torch.save never "
                        "compresses (a zip bomb, or a re-packed file)",
                    )
                handle.seek(info.header_offset)
                local = handle.read(_LOCAL_HEADER.size)
                if len(local) < _LOCAL_HEADER.size or local[:4] != b"PK\x03\x04":
                    raise CheckpointError(str(path), "malformed zip archive (a local header)")
                _, name_len, extra_len = _LOCAL_HEADER.unpack(local)
                records[info.header_offset + _LOCAL_HEADER.size + name_len + extra_len] = info
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(str(path), f"malformed zip archive ({clip(str(exc), 80)})") from exc
    for name, tensor in _state_dict(path, on_meta).items():
        storage = tensor.untyped_storage()
        offset = getattr(storage, "_checkpoint_offset", None)
        if offset is None:
            continue  # a torch that does not tell (before 2.5): the compression check stands
        info = records.get(offset)
        if info is None:
            raise CheckpointError(str(path), "its data is at no record of the zip archive", name)
        if info.file_size != storage.nbytes():
            raise CheckpointError(
                str(path),
                f"its data needs {storage.nbytes()} bytes, its zip record holds "
                f"{info.file_size} (a truncated or tampered file)",
                name,
            )


def _load_failure(path: Path, exc: Exception) -> str:
    """Why torch.load failed, in words that quote none of the file's bytes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch colours part of its message
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        return f"refused: this pickle needs code beyond plain tensors ({_unpickle_reason(text)})"
    if not _looks_like_torch(path):
        # torch's own words may quote the file ("invalid load key, 'r'.")
        return "not a torch file (neither a zip archive nor a pickle)"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"not a readable torch file: {type(exc).__name__}: {clip(first, 200)}"


def _looks_like_torch(path: Path) -> bool:
    """A zip archive, or a pickle of protocol 2 or later (what torch.save's legacy format is)."""
    with open(path, "rb") as handle:
        if zipfile.is_zipfile(handle):
            return True
        handle.seek(0)
        return handle.read(1) == b"\x80"


def _unpickle_reason(text: str) -> str:
    """The useful line of torch's long weights_only message (what it refused to load)."""
    found = re.search(
        r"WeightsUnpickler error:\s*(.*?)(?: was not an allowed global|\. Please use|\n\n|$)",
        text,
        re.S,
    )
    if found and found.group(1).strip():
        return clip(found.group(1).strip(), 200)
    return clip(text.strip().splitlines()[0], 200)


def _unwrap_state_dict(obj: object) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
        for key in ("state_dict", "model", "module"):
            if key in obj:
                return _unwrap_state_dict(obj[key])
    return None
