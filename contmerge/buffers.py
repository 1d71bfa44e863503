"""Large buffers on transparent huge pages, where the kernel offers them.

A fold streams through the whole state at memory speed. On 4 KiB pages every page of every
stream costs a TLB miss; the same loop over memory on 2 MiB pages ran about 20 % faster here.
numpy asks the kernel for huge pages (``madvise``) for its large arrays; torch does not. So the
engine's big buffers are numpy bytes, seen as torch tensors (``numpy_dtype`` names the view).
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: numpy asks for huge pages from this size on
HUGE_BYTES = 4 << 20


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; large ones on huge pages."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_BYTES:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(np.empty(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of zeros; large ones on huge pages. Written, not calloc'ed: untouched zero pages
    are later faulted in one 4 KiB page at a time, on the first fold that writes them."""
    return empty(shape, dtype).zero_()


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """numpy's dtype for a torch dtype numpy has (not bfloat16)."""
    return torch.empty(0, dtype=dtype).numpy().dtype
