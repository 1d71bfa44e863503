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
import stat
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from . import jsonfile
from .errors import CheckpointError, clip
from .jsonfile import Pairs
from .limits import (  # noqa: F401 - re-exported where they used to live
    DEFAULT_MAX_HEADER_BYTES,
    MAX_HEADER_ENV,
    header_limit,
    parse_size,
    using_header_limit,
)

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
FOREIGN_SIGNATURES = (b"PK\x03\x04", b"\x80\x02", b"\x80\x04", b"\x80\x05")
_DIM_LIMIT = 1 << 63  # dimensions and element counts must fit an int64 (torch's sizes)


@dataclass(frozen=True, slots=True)  # slots: a header may describe a hundred thousand tensors
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


class _Entry(tuple):
    """A well-formed tensor entry, made as the parser meets it: ``(meta, begin, end)``. Turning
    entries into this at once, rather than after the whole header is a tree of dicts and lists,
    keeps a large header's parse at a few times its size in memory."""


def _compact(pairs: list[tuple[str, Any]]) -> Any:
    """The parser's object hook: a tensor entry as an ``_Entry``, anything else as ``Pairs``
    (so that the caller finds what is wrong with it, and repeated keys)."""
    if len(pairs) == 3:
        fields = dict(pairs)
        code = fields.get("dtype")
        dtype = DTYPE_BY_CODE.get(code) if isinstance(code, str) else None
        shape, offsets = fields.get("shape"), fields.get("data_offsets")
        if (
            dtype is not None
            and _is_shape(shape)
            and _is_offsets(offsets)
            and (offsets[1] - offsets[0]) == math.prod(shape) * dtype.itemsize
        ):
            return _Entry((TensorMeta(tuple(shape), dtype), offsets[0], offsets[1]))
    return Pairs(pairs)


def _is_int(value: object) -> bool:
    return type(value) is int  # not bool, which Python counts as an int


def _is_shape(shape: object) -> bool:
    return (
        type(shape) is list
        and all(_is_int(d) and 0 <= d < _DIM_LIMIT for d in shape)
        and math.prod(d for d in shape if d) < _DIM_LIMIT
    )


def _is_offsets(offsets: object) -> bool:
    return (
        type(offsets) is list
        and len(offsets) == 2
        and all(_is_int(o) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    )


def _quoted(value: object) -> str:
    """A header value for a message: short, and only once the header has parsed as JSON."""
    if isinstance(value, Pairs):
        return "an object"
    return clip(repr(value), 60)


def prefix_problem(prefix: bytes, size: int, limit: int) -> str | None:
    """Why a file of ``size`` bytes starting with ``prefix`` (its first 8 bytes) cannot be a
    safetensors file with a header of at most ``limit`` bytes, or None: the reader's first check,
    and ``sources.recognise``'s look at a weight file."""
    if len(prefix) < 8:
        return f"truncated: {size} bytes is too short for a safetensors file"
    (header_len,) = struct.unpack("<Q", prefix[:8])
    # the length is the file's first 8 bytes: for a file that is not safetensors it is
    # content, so no message quotes it
    if prefix.startswith(FOREIGN_SIGNATURES) and header_len > min(size - 8, limit):
        return "this is a pickle/zip (torch.save) file, not safetensors"
    if header_len > size - 8:
        return (
            "truncated, or not a safetensors file: the header length in its first 8 bytes "
            f"is larger than the file ({size} bytes)"
        )
    if header_len > limit:
        return (
            f"the header is larger than the {limit}-byte limit: not a safetensors file, or "
            f"raise the limit (--max-header-bytes, ${MAX_HEADER_ENV})"
        )
    return None


class SafetensorsReader:
    """Lazy reader of one ``.safetensors`` file: the header is parsed and checked up front,
    as strictly as the format's reference reader, with a bound on its size (see
    ``max_header_bytes``)."""

    def __init__(self, path: str | Path, max_header_bytes: int | None = None) -> None:
        self.path = Path(path)
        limit = header_limit(max_header_bytes)
        try:
            # non-blocking: opening a FIFO would otherwise wait for a writer forever
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise _fail(self.path, f"cannot open: {exc.strerror}") from exc
        self._handle: BinaryIO = os.fdopen(fd, "rb")
        self._map: mmap.mmap | None = None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _fail(self.path, "not a regular file")
            self._parse_header(limit)
        except BaseException:
            self._handle.close()
            raise

    def _parse_header(self, limit: int) -> None:
        size = os.fstat(self._handle.fileno()).st_size
        prefix = self._handle.read(8)
        problem = prefix_problem(prefix, size, limit)
        if problem is not None:
            raise _fail(self.path, problem)
        (header_len,) = struct.unpack("<Q", prefix)
        foreign = prefix.startswith(FOREIGN_SIGNATURES)
        raw = self._handle.read(header_len)
        if len(raw) < header_len:
            raise _fail(self.path, "truncated while reading the header")
        # a pickle/zip signature in the length proves nothing by itself: name the format only
        # once the file has failed to parse as safetensors
        if foreign and not raw.lstrip(b" ").startswith(b"{"):
            raise _fail(self.path, "this is a pickle/zip (torch.save) file, not safetensors")
        try:
            text = jsonfile.utf8(raw)
            del raw  # the header is untrusted and may be large: hold one copy at a time
            top = jsonfile.parse(text, _compact)
        except jsonfile.JsonError as exc:
            raise _fail(self.path, f"malformed header: {exc}") from None
        del text
        if not isinstance(top, Pairs):
            raise _fail(self.path, "malformed header: not a JSON object of tensors")
        self.data_start = 8 + header_len
        self.metadata: dict[str, str] = {}
        self.meta: dict[str, TensorMeta] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        seen_metadata = False
        for i, (name, entry) in enumerate(top):
            top[i] = None  # the parsed header is let go as it is checked (see _Entry)
            self._check_name(name)
            if name == "__metadata__":
                if seen_metadata:
                    raise _fail(self.path, "malformed header: __metadata__ given twice")
                seen_metadata = True
                self._read_metadata(entry)
                continue
            if not isinstance(entry, _Entry):
                entry = self._explain_entry(name, entry)
            meta, begin, end = entry
            if name in self.meta:
                same = self._offsets[name] == (begin, end) and self.meta[name] == meta
                what = "the same entry" if same else "entries pointing at different data"
                raise _fail(self.path, f"malformed header: tensor listed twice ({what})", name)
            self.meta[name] = meta
            self._offsets[name] = (begin, end)
        self._check_layout(size)

    def _check_name(self, name: str) -> None:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
            raise _fail(self.path, "malformed header: a name is not valid Unicode") from None

    def _read_metadata(self, value: object) -> None:
        if value is None:
            return  # the reference reader takes null for "no metadata"
        try:
            metadata = jsonfile.as_dict(value, "__metadata__")
        except jsonfile.JsonError as exc:
            raise _fail(self.path, f"malformed header: {exc}") from None
        for key, item in metadata.items():
            if not isinstance(item, str):
                raise _fail(
                    self.path,
                    f"malformed header: __metadata__ value of {clip(key)!r} is not a string",
                )
            self._check_name(item)
        self.metadata = metadata

    def _explain_entry(self, name: str, entry: object) -> tuple[TensorMeta, int, int]:
        """Why an entry the parser could not take is malformed (always raises)."""
        try:
            fields = jsonfile.as_dict(entry, "its entry")
        except jsonfile.JsonError as exc:
            raise _fail(self.path, f"malformed header entry: {exc}", name) from None
        code, shape, offsets = fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")
        if not isinstance(code, str) or code not in DTYPE_BY_CODE:
            raise _fail(self.path, f"unknown or unsupported dtype {_quoted(code)}", name)
        if not _is_shape(shape):
            raise _fail(self.path, f"malformed shape {_quoted(shape)}", name)
        if not _is_offsets(offsets):
            raise _fail(self.path, f"malformed data_offsets {_quoted(offsets)}", name)
        nbytes = math.prod(shape) * DTYPE_BY_CODE[code].itemsize  # type: ignore[arg-type]
        span = offsets[1] - offsets[0]  # type: ignore[index]
        if span != nbytes:
            raise _fail(
                self.path,
                f"data_offsets span {span} bytes but shape {shape} of {code} needs {nbytes}",
                name,
            )
        # only keys beyond the three (which the format allows) kept the parser from taking it
        return TensorMeta(tuple(shape), DTYPE_BY_CODE[code]), offsets[0], offsets[1]  # type: ignore

    def _check_layout(self, size: int) -> None:
        """The data must tile the byte buffer exactly: no overlap, no gap, nothing after."""
        expected, previous = 0, None
        for name, (begin, end) in sorted(self._offsets.items(), key=lambda item: item[1]):
            if begin < expected:
                raise _fail(
                    self.path,
                    f"malformed header: tensor data overlaps that of {clip(previous or '')!r}",
                    name,
                )
            if begin > expected:
                raise _fail(
                    self.path,
                    f"malformed header: a gap of {begin - expected} bytes before its data",
                    name,
                )
            expected, previous = end, name
        available = size - self.data_start
        if expected > available:
            # name the first tensor whose data is cut, so the message says what was lost
            cut = next(
                n
                for n, (_, end) in sorted(self._offsets.items(), key=lambda i: i[1])
                if end > available
            )
            raise _fail(
                self.path,
                f"truncated: data needs {self.data_start + expected} bytes, file has {size}",
                cut,
            )
        if expected < available:
            raise _fail(
                self.path,
                f"malformed: {available - expected} bytes after the last tensor's data belong to "
                "no tensor",
            )

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
