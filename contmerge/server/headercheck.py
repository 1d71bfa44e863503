"""The first 8 bytes of a safetensors file, checked before anything parses the header.

They give the header's length. The server refuses a header over its bound as soon as those
bytes arrive (a valid 100 MB header costs gigabytes to parse), and refuses a length the file
cannot hold without quoting it: for a file that is not safetensors at all (a text file, a
symlinked secret) that number is the file's own first bytes, which must never reach a client.
"""

from __future__ import annotations

import struct

from ..tensorfile import FOREIGN_SIGNATURES

PREFIX_BYTES = 8
NOT_SAFETENSORS = "not a safetensors file, or truncated"


def header_problem(prefix: bytes, size: int | None, limit: int) -> tuple[int, str] | None:
    """(HTTP status, reason) when ``prefix`` (the first 8 bytes of a file of ``size`` bytes, if
    known) declares a header the server will not read; None when it is worth parsing."""
    if len(prefix) < PREFIX_BYTES:
        return None  # too short to say: the reader names the truncation
    (length,) = struct.unpack("<Q", prefix[:PREFIX_BYTES])
    fits = size is None or PREFIX_BYTES + length <= size
    if length <= limit and fits:
        return None
    if prefix.startswith(FOREIGN_SIGNATURES):
        return 422, "this is a pickle/zip (torch.save) file, not safetensors"
    if not fits:
        return 422, (
            f"{NOT_SAFETENSORS}: its first 8 bytes do not give a header length that fits in its "
            f"{size} bytes"
        )
    if size is None:
        # a length that may be nothing but the bytes of some other format: not quoted
        return 413, (
            f"its first 8 bytes declare a safetensors header over the limit of {limit} bytes "
            "(--max-header-bytes), or it is not a safetensors file"
        )
    return 413, f"safetensors header of {length} bytes is over the limit of {limit} bytes " + (
        "(--max-header-bytes)"
    )
