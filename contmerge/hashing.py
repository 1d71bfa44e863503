"""Content hashes of models: xxh3-128 over fixed 1 MiB leaves, combined in order.

A model's hash must be computed while its bytes stream past at memory speed, by several threads
at once: SHA-256 runs at under 2 GB/s, xxh3 at tens of GB/s. The hash is a two-level tree, so
each leaf can be hashed by whichever thread holds it while it is in cache: the top-level xxh3-128
is fed, tensor by tensor, with a header (name, dtype, shape) and the 16-byte digests of the
tensor's bytes cut into 1 MiB leaves. The value depends only on the tensors, never on how the
work was split. It is a fingerprint for recognising repeated arrivals, not a defence against a
forger: uploads to the server are also SHA-256'd as they arrive.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import xxhash

from .tensorfile import CODE_BY_DTYPE

ALGORITHM = "xxh3-128-tree/1MiB"
LEAF_BYTES = 1 << 20


def leaf_digest(data: torch.Tensor | np.ndarray) -> bytes:
    """Digest of one leaf (a contiguous tensor or array of at most ``LEAF_BYTES`` bytes)."""
    array = data.view(-1).view(torch.uint8).numpy() if isinstance(data, torch.Tensor) else data
    return xxhash.xxh3_128_digest(array)


def tensor_leaves(tensor: torch.Tensor) -> list[bytes]:
    """The leaf digests of a tensor held whole in memory."""
    flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
    return [leaf_digest(flat[i : i + LEAF_BYTES]) for i in range(0, flat.numel(), LEAF_BYTES)]


class ContentHash:
    """The running hash of a model, fed one tensor at a time in the model's order."""

    algorithm = ALGORITHM

    def __init__(self) -> None:
        self._top = xxhash.xxh3_128()

    def add(self, name: str, dtype: torch.dtype, shape: Iterable[int], leaves: list[bytes]) -> None:
        """One tensor: its header, then its leaves' digests in order."""
        self._top.update(f"{name}\0{CODE_BY_DTYPE[dtype]}\0{list(shape)}\0".encode())
        self._top.update(b"".join(leaves))

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """One tensor held whole in memory."""
        self.add(name, tensor.dtype, tensor.shape, tensor_leaves(tensor))

    def hexdigest(self) -> str:
        return self._top.hexdigest()
