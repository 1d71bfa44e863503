"""Torch tensors <-> Flower ``ArrayRecord``, bit-exact for every dtype, and read lazily.

Flower serialises each ``Array`` as a NumPy ``.npy`` buffer, and NumPy has no bfloat16 or
float8, so ``ArrayRecord(state_dict)`` refuses such tensors (transformers checkpoints are often
bf16). Here they travel as their raw bits in the integer type of the same width, and the
``Array.dtype`` field, which Flower carries as plain metadata, names the real dtype::

    Array(dtype="bfloat16", shape=(4096, 4096), stype="numpy.ndarray", data=<npy of int16 bits>)

Anything generic (``Array.numpy()``, Flower's own logging) still sees a valid int16 array; the
decoder here views the bits back as bfloat16, so the round trip is bit-exact (NaN payloads and
signed zeros included). Every other dtype goes through NumPy unchanged.

:class:`ArrayRecordCheckpoint` exposes an ``ArrayRecord`` (a client reply, a broadcast model) as a
contmerge :class:`~contmerge.sources.Checkpoint`: names, shapes and dtypes come from the Array
metadata without decoding anything, and one tensor is decoded per ``read``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

from ..errors import CheckpointError
from ..sources import Checkpoint
from ..tensorfile import TensorMeta

#: dtypes NumPy cannot hold -> the integer dtype whose bits carry them on the wire
BITS_CARRIER: dict[torch.dtype, torch.dtype] = {
    torch.bfloat16: torch.int16,
    torch.float8_e4m3fn: torch.uint8,
    torch.float8_e5m2: torch.uint8,
}

#: ``Array.dtype`` tag -> torch dtype, for everything this module sends or accepts
DTYPE_BY_TAG: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "uint16": torch.uint16,
    "uint32": torch.uint32,
    "uint64": torch.uint64,
    "bool": torch.bool,
}
TAG_BY_DTYPE: dict[torch.dtype, str] = {dtype: tag for tag, dtype in DTYPE_BY_TAG.items()}


def tensor_to_array(tensor: torch.Tensor) -> Array:
    """One tensor as a Flower ``Array`` (a copy; dtypes NumPy lacks travel as tagged bits)."""
    tensor = tensor.detach().cpu().contiguous()
    tag = TAG_BY_DTYPE.get(tensor.dtype)
    if tag is None:
        raise TypeError(f"cannot send a {tensor.dtype} tensor through Flower")
    carrier = BITS_CARRIER.get(tensor.dtype)
    if carrier is None:
        return Array(tensor.numpy())
    wire = Array(tensor.view(carrier).numpy())
    # Same npy payload, but the metadata names the real dtype (see module docstring).
    return Array(dtype=tag, shape=tuple(tensor.shape), stype=wire.stype, data=wire.data)


def array_meta(array: Array, name: str, source: str) -> TensorMeta:
    """Shape and dtype an Array declares, from its metadata only."""
    dtype = DTYPE_BY_TAG.get(array.dtype)
    if dtype is None:
        raise CheckpointError(source, f"unsupported array dtype {array.dtype!r}", name)
    if array.stype != SType.NUMPY:
        raise CheckpointError(source, f"unsupported array serialisation {array.stype!r}", name)
    return TensorMeta(tuple(int(d) for d in array.shape), dtype)


def array_to_tensor(
    array: Array, name: str = "<array>", source: str = "<ArrayRecord>"
) -> torch.Tensor:
    """Decode one Array into a tensor, checking that its payload matches its metadata."""
    meta = array_meta(array, name, source)
    try:
        wire = array.numpy()
    except (ValueError, OSError, TypeError) as exc:
        raise CheckpointError(source, f"unreadable array payload: {exc}", name) from exc
    carrier = BITS_CARRIER.get(meta.dtype, meta.dtype)
    if wire.dtype != np.dtype(str(carrier).removeprefix("torch.")) or wire.shape != meta.shape:
        raise CheckpointError(
            source,
            f"payload is {wire.dtype}{list(wire.shape)} but the array declares "
            f"{array.dtype}{list(meta.shape)}",
            name,
        )
    if not (wire.flags.c_contiguous and wire.flags.writeable):
        wire = wire.copy()  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    tensor = torch.from_numpy(wire)
    return tensor.view(meta.dtype) if carrier is not meta.dtype else tensor


def to_array_record(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> ArrayRecord:
    """A state dict (or a stream of ``(name, tensor)``) as an ArrayRecord, one tensor at a time."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    record = ArrayRecord()
    for name, tensor in items:
        record[name] = tensor_to_array(tensor)
    return record


def from_array_record(
    record: ArrayRecord, source: str = "<ArrayRecord>"
) -> dict[str, torch.Tensor]:
    """An ArrayRecord as a state dict with the original dtypes (bf16 restored bit-exactly)."""
    return {name: array_to_tensor(array, name, source) for name, array in record.items()}


class ArrayRecordCheckpoint(Checkpoint):
    """An ArrayRecord read as a contmerge checkpoint: metadata up front, one tensor per read.

    A reply whose payload disagrees with its declared shape or dtype fails on ``read`` with a
    :class:`~contmerge.errors.CheckpointError`, so the Merger rejects it before committing.
    """

    def __init__(self, record: ArrayRecord, source: str = "<ArrayRecord>") -> None:
        if not isinstance(record, ArrayRecord):
            raise CheckpointError(source, f"expected an ArrayRecord, got {type(record).__name__}")
        self.source = source
        self._record = record
        self.meta = {name: array_meta(array, name, source) for name, array in record.items()}

    def read(self, name: str) -> torch.Tensor:
        return array_to_tensor(self._record[name], name, self.source)

    def close(self) -> None:
        # Drop our reference so a reply can be freed as soon as its fold is done.
        self._record = ArrayRecord()


def record_digest(record: ArrayRecord) -> str:
    """SHA-256 over every array's name, dtype tag, shape and payload: equal iff bit-identical."""
    digest = hashlib.sha256()
    for name in sorted(record):
        array = record[name]
        digest.update(f"{name}\0{array.dtype}\0{list(array.shape)}\0".encode())
        digest.update(array.data)
    return digest.hexdigest()
