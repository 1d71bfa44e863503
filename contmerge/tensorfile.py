"""Streaming safetensors reading and writing, one tensor at a time.

A tensor is either read with ``pread`` into a buffer of its own (``read``: safe to keep and to
write into) or looked at in place through a private memory map of the file (``view``: no copy,
for the fold's single pass over it). Pages a view touches count towards the process's resident
size until ``release`` drops them, so resident memory stays bounded by the tensors in flight even
for models larger than RAM. Files are byte-compatible with the safetensors format.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from .errors import CheckpointError

DTYPE_BY_CODE: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
CODE_BY_DTYPE = {dtype: code for code, dtype in DTYPE_BY_CODE.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024
FOREIGN_SIGNATURES = (b"PK\x03\x04", b"\x80\x02", b"\x80\x04", b"\x80\x05")


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of a tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point

    @staticmethod
    def of(tensor: torch.Tensor) -> TensorMeta:
        return TensorMeta(tuple(tensor.shape), tensor.dtype)


def _fail(path: Path, reason: str, tensor: str | None = None) -> CheckpointError:
    return CheckpointError(str(path), reason, tensor)


class SafetensorsReader:
    """Lazy reader of one ``.safetensors`` file: the header is parsed and checked up front."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._handle: BinaryIO = open(self.path, "rb")
        except OSError as exc:
            raise _fail(self.path, f"cannot open: {exc.strerror}") from exc
        self._map: mmap.mmap | None = None
        try:
            self._parse_header()
        except BaseException:
            self._handle.close()
            raise

    def _parse_header(self) -> None:
        size = os.fstat(self._handle.fileno()).st_size
        prefix = self._handle.read(8)
        if len(prefix) < 8:
            raise _fail(self.path, f"truncated: {size} bytes is too short for a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        raw = self._handle.read(header_len) if header_len <= MAX_HEADER_BYTES else b""
        # the first 8 bytes are a length, so a pickle/zip signature there proves nothing by
        # itself: name the format only once the file has failed to parse as safetensors
        foreign = prefix.startswith(FOREIGN_SIGNATURES) and not raw.startswith(b"{")
        if foreign:
            raise _fail(self.path, "this is a pickle/zip (torch.save) file, not safetensors")
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise _fail(
                self.path,
                f"malformed or truncated header (declares {header_len} header bytes, "
                f"file has {size})",
            )
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _fail(self.path, f"malformed header: not valid JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise _fail(self.path, "malformed header: not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise _fail(self.path, "malformed header: __metadata__ is not an object")
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in metadata.items()}
        self.data_start = 8 + header_len
        self.meta: dict[str, TensorMeta] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        spans: list[tuple[int, int, str]] = []
        for name, entry in header.items():
            meta, begin, end = self._check_entry(name, entry)
            self.meta[name] = meta
            self._offsets[name] = (begin, end)
            spans.append((begin, end, name))
        expected = 0
        for begin, end, name in sorted(spans):
            if begin != expected:
                raise _fail(
                    self.path, "malformed header: tensor data overlaps or leaves a gap", name
                )
            expected = end
        if self.data_start + expected > size:
            # name the first tensor whose data is cut, so the message says what was lost
            cut = next(name for _, end, name in sorted(spans) if self.data_start + end > size)
            raise _fail(
                self.path,
                f"truncated: data needs {self.data_start + expected} bytes, file has {size}",
                cut,
            )

    def _check_entry(self, name: str, entry: object) -> tuple[TensorMeta, int, int]:
        if not isinstance(entry, dict):
            raise _fail(self.path, "malformed header entry", name)
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if code not in DTYPE_BY_CODE:
            raise _fail(self.path, f"unknown dtype {code!r}", name)
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise _fail(self.path, f"malformed shape {shape!r}", name)
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise _fail(self.path, f"malformed data_offsets {offsets!r}", name)
        meta = TensorMeta(tuple(shape), DTYPE_BY_CODE[code])
        if offsets[1] - offsets[0] != meta.nbytes:
            raise _fail(
                self.path,
                f"data_offsets span {offsets[1] - offsets[0]} bytes but shape {shape} of "
                f"{code} needs {meta.nbytes}",
                name,
            )
        return meta, offsets[0], offsets[1]

    def keys(self) -> list[str]:
        return list(self.meta)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory owned by torch (no mapping of the file)."""
        meta = self.meta[name]
        out = torch.empty(meta.shape, dtype=meta.dtype)
        self.read_into(name, 0, out.view(-1))
        return out

    def read_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Entries ``start : start + out.numel()`` of the flattened tensor, read into ``out``
        (a contiguous buffer of the tensor's dtype)."""
        raw = out.view(-1).view(torch.uint8).numpy()
        self.read_bytes(name, start * self.meta[name].dtype.itemsize, raw)
        return out

    def read_bytes(self, name: str, offset: int, out: np.ndarray) -> np.ndarray:
        """Bytes ``offset : offset + out.size`` of tensor ``name``'s data, read into ``out``
        (uint8; typically a buffer reused and hot in cache)."""
        if out.size:
            begin, _ = self._offsets[name]
            at = self.data_start + begin + offset
            _pread_exact(self._handle.fileno(), memoryview(out), at, self.path, name)
        return out

    def view(self, name: str) -> torch.Tensor:
        """The tensor in place, through a private map of the file (writes would not reach it).

        The header and the file's size were checked when it was opened; a file truncated by
        someone else while mapped would fault, so views are for files nobody rewrites in place
        (checkpoints, the engine's own state files).
        """
        meta = self.meta[name]
        if meta.nbytes == 0:
            return torch.empty(meta.shape, dtype=meta.dtype)
        if self._map is None:
            self._map = mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_COPY)
        begin, _ = self._offsets[name]
        flat = torch.frombuffer(
            self._map, dtype=meta.dtype, count=meta.numel, offset=self.data_start + begin
        )
        return flat.view(meta.shape)

    def release(self, name: str) -> None:
        """Drop the pages a view of ``name`` touched from the process (they stay cached)."""
        if self._map is None or self.meta[name].nbytes == 0:
            return
        begin, end = self._offsets[name]
        start = (self.data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, self.data_start + end - start)

    def close(self) -> None:
        if self._map is not None:
            # views still alive keep the mapping until they go; it is unmapped with the last
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        self._handle.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pread_exact(fd: int, view: memoryview, offset: int, path: Path, name: str) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise _fail(path, "truncated while reading tensor data", name)
        done += got


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor; the header is laid out from metas up front."""

    def __init__(
        self,
        handle: BinaryIO,
        metas: Mapping[str, TensorMeta],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self._handle = handle
        self._metas = dict(metas)
        self._order = list(self._metas)
        self._next = 0
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, meta in self._metas.items():
            header[name] = {
                "dtype": CODE_BY_DTYPE[meta.dtype],
                "shape": list(meta.shape),
                "data_offsets": [offset, offset + meta.nbytes],
            }
            offset += meta.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; tensors must come in the order the metas were given."""
        if self._next >= len(self._order) or self._order[self._next] != name:
            raise ValueError(f"tensor {name!r} written out of order")
        meta = self._metas[name]
        if TensorMeta.of(tensor) != meta:
            raise ValueError(f"tensor {name!r} is {TensorMeta.of(tensor)}, header says {meta}")
        if meta.nbytes:
            data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
            self._handle.write(memoryview(data))
        self._next += 1

    def finish(self) -> None:
        if self._next != len(self._order):
            missing = self._order[self._next]
            raise ValueError(f"safetensors file closed before tensor {missing!r} was written")


def write_safetensors(
    handle: BinaryIO,
    tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write in-memory tensors (small files: manifests' companions, tests, emits of dicts)."""
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    writer = SafetensorsWriter(handle, {n: TensorMeta.of(t) for n, t in items}, metadata)
    for name, tensor in items:
        writer.write(name, tensor)
    writer.finish()
