"""Loading a ``torch.save`` file without trusting it.

``torch.load(weights_only=True)`` runs no pickle code, and ``mmap=True`` keeps the tensors on
disk until read. But a memory-mapped load takes each storage's bytes at its zip record's offset
without checking the record's size: a record shorter than its storage (a truncated or tampered
file) is read as garbage weights, silently, and so is a record stored compressed (torch.save
never compresses; a zip bomb would). So before any tensor is read: no record may be compressed,
and each storage the pickle asks for must be a record of exactly its size. The sizes come from
scanning the pickle with an unpickler that resolves every global to an inert stand-in, so
nothing the file names is ever called.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch.storage import _get_dtype_from_pickle_storage_type

from .errors import CheckpointError, clip


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``; CheckpointError naming it (and a tensor) if it is not one."""
    if not path.is_file():  # torch.load of a FIFO would wait for a writer forever
        raise CheckpointError(str(path), "not a regular file")
    if path.stat().st_size == 0:
        raise CheckpointError(str(path), "empty file")
    zipped = zipfile.is_zipfile(path)
    records = _stored_records(path) if zipped else {}
    # mmap keeps tensors on disk until read; it needs the zip format of torch >= 1.6
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as exc:  # torch raises many kinds (e.g. AttributeError for f8 legacy)
        raise CheckpointError(str(path), _load_failure(path, exc)) from exc
    tensors = _unwrap_state_dict(loaded)
    if tensors is None:
        raise CheckpointError(str(path), "does not hold a state dict of tensors")
    if zipped:  # before any tensor's bytes are looked at
        _check_storages(path, records)
    return tensors


def _stored_records(path: Path) -> dict[str, zipfile.ZipInfo]:
    """The archive's records by name, each checked to be stored uncompressed."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(str(path), f"malformed zip archive ({clip(str(exc), 80)})") from exc
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                str(path),
                f"zip record {clip(info.filename, 60)!r} is compressed: torch.save never "
                "compresses (a zip bomb, or a re-packed file)",
            )
    return {info.filename: info for info in infos}


def _check_storages(path: Path, records: Mapping[str, zipfile.ZipInfo]) -> None:
    """Every storage the pickle asks for is a record of exactly its size."""
    pickles = [name for name in records if name.endswith("data.pkl")]
    if len(pickles) != 1:
        raise CheckpointError(str(path), "not a torch.save archive (no single data.pkl)")
    folder = pickles[0][: -len("data.pkl")]
    with zipfile.ZipFile(path) as archive:
        scan = _StorageScan(archive.read(pickles[0]))
    try:
        tensors = _tensor_keys(scan.load())
    except Exception as exc:  # torch.load took this pickle: failing here means tampering
        reason = f"its pickle does not scan ({type(exc).__name__})"
        raise CheckpointError(str(path), reason) from exc
    for key, nbytes in scan.sizes.items():
        info = records.get(f"{folder}data/{key}")
        held = "no zip record" if info is None else f"a zip record of {info.file_size} bytes"
        if info is None or info.file_size != nbytes:
            raise CheckpointError(
                str(path),
                f"its data needs {nbytes} bytes, it has {held} (a truncated or tampered file)",
                next((name for name, k in tensors.items() if k == key), None),
            )


class _Inert:
    """What every global of a scanned pickle becomes: callable, settable, and does nothing
    (but keep the items set on it: a state dict saved as an OrderedDict is one of these)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.items: dict[object, object] = {}

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        self.items[key] = value

    def append(self, value: object) -> None:
        pass

    def extend(self, values: object) -> None:
        pass


class _Storage:
    def __init__(self, key: str) -> None:
        self.key = key


class _Tensor:
    def __init__(self, storage: object = None, *args: object, **kwargs: object) -> None:
        self.key = storage.key if isinstance(storage, _Storage) else None


class _StorageScan(pickle.Unpickler):
    """Reads torch's storage references ``('storage', type, key, location, numel)`` and which
    tensor names use them; every global resolves to a stand-in of this module."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.sizes: dict[str, int] = {}

    def find_class(self, module: str, name: str) -> object:
        if module in ("torch", "torch.storage") and name.endswith("Storage"):
            return ("storage-type", name)  # only its name is used
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3"):
            return _Tensor
        return _Inert

    def persistent_load(self, pid: object) -> object:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError("not a storage reference")
        _, kind, key, _, numel = pid
        itemsize = _itemsize(kind)
        if itemsize is None or not isinstance(key, str) or type(numel) is not int:
            raise pickle.UnpicklingError("a malformed storage reference")
        self.sizes[key] = numel * itemsize
        return _Storage(key)


def _itemsize(kind: object) -> int | None:
    if not (isinstance(kind, tuple) and len(kind) == 2 and kind[0] == "storage-type"):
        return None
    if kind[1] == "UntypedStorage":  # newer dtypes (float8, uint16...): numel counts bytes
        return 1
    try:  # what torch.load itself maps "FloatStorage" with
        return _get_dtype_from_pickle_storage_type(kind[1]).itemsize
    except KeyError:
        return None


def _tensor_keys(obj: object, depth: int = 0) -> dict[str, str]:
    """Tensor name -> storage key, wherever the (nested) state dict put them."""
    items = obj.items if isinstance(obj, _Inert) else obj
    if not isinstance(items, dict) or depth > 4:
        return {}
    out: dict[str, str] = {}
    for name, value in items.items():
        if isinstance(value, _Tensor) and isinstance(name, str) and value.key is not None:
            out.setdefault(name, value.key)
        else:
            out.update(_tensor_keys(value, depth + 1))
    return out


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
