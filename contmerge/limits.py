"""Bounds on untrusted input that the command line sets before anything heavy is imported: the
size of a header or shard index, and how far an arrival may move from the base."""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

from .errors import SettingError, clip

#: the largest header read unless told otherwise. A header is ~120 bytes per tensor: a shard of
#: even the largest MoE models holds a few thousand tensors (< 1 MiB), and 16 MiB still holds a
#: whole 1T-parameter MoE (~130 000 tensors) in one file. Parsing costs a few times the header
#: in memory, so the bound is what an untrusted file can make the reader allocate.
DEFAULT_MAX_HEADER_BYTES = 16 << 20
MAX_HEADER_ENV = "CONTMERGE_MAX_HEADER_BYTES"
#: an arrival whose weight matrices moved, in the median, by more than this fraction of their
#: norm in the base is refused as "fine-tuned from another base". Fine-tunes measured here
#: move 0.05–0.09; two random inits of one architecture sit near √2.
DEFAULT_MAX_RELATIVE_DELTA = 0.5


def parse_size(text: str) -> int:
    """``"16777216"``, ``"64K"``, ``"16M"``, ``"1G"`` (binary units) as a positive byte count."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    clean = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (clean[:-1], clean[-1]) if clean[-1:] in units else (clean, "")
    try:
        value = int(number) * units[unit]
    except ValueError:
        value = 0
    if value <= 0:
        raise SettingError(f"not a size in bytes: {clip(text)!r} (e.g. 16777216, 64M, 1G)")
    return value


_limit_in_force: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "contmerge_max_header_bytes", default=None
)


def header_limit(given: int | None = None) -> int:
    """The header bound in force: ``given``, else the one ``using_header_limit`` set, else
    $CONTMERGE_MAX_HEADER_BYTES, else 16 MiB."""
    given = given if given is not None else _limit_in_force.get()
    if given is not None:
        if given <= 0:
            raise SettingError(f"max_header_bytes must be positive, got {given}")
        return given
    from_env = os.environ.get(MAX_HEADER_ENV)
    return parse_size(from_env) if from_env else DEFAULT_MAX_HEADER_BYTES


@contextlib.contextmanager
def using_header_limit(limit: int | None) -> Iterator[None]:
    """Bound every header read inside the block (in this thread) by ``limit``; None: no change.
    How a command-line option reaches readers opened deep inside the Merger."""
    token = _limit_in_force.set(limit)
    try:
        yield
    finally:
        _limit_in_force.reset(token)
