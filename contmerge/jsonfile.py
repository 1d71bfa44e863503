"""Strict JSON for untrusted files: UTF-8 only, no NaN/Infinity, no repeated keys, plain errors.

Python's ``json`` is more lenient than the JSON the safetensors format (serde_json) and the
Hugging Face files around it accept: it guesses UTF-16/32 from the first bytes, takes ``NaN``
and ``Infinity``, keeps the last of repeated keys silently, and its errors may quote the input
(a byte of a file that is not JSON at all). Errors here say what is wrong and where, never what
the bytes were, so a reason can be shown to whoever sent the file.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import CheckpointError, clip


class JsonError(ValueError):
    """Input that is not strict JSON; the message quotes none of it."""


class Pairs(list):
    """A JSON object as its ``(key, value)`` pairs in file order, repeats kept (the parser's
    ``object_pairs_hook``): a ``dict`` would drop a repeated key before anyone could see it."""


def _reject_constant(name: str) -> None:
    raise JsonError(f"{name} is not a JSON value")


def utf8(raw: bytes) -> str:
    """``raw`` as UTF-8 text (the only encoding the format allows: no guessing UTF-16)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonError(f"not valid UTF-8 (at byte {exc.start})") from None


def parse(text: str, object_hook: Callable[[list], Any] = Pairs) -> Any:
    """Parse ``text`` as strict JSON; objects come back through ``object_hook`` (see Pairs)."""
    try:
        return json.loads(text, object_pairs_hook=object_hook, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise JsonError(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:
        raise JsonError("not valid JSON (nested too deeply)") from None
    except JsonError:
        raise
    except ValueError:  # e.g. an integer longer than Python converts (sys.int_max_str_digits)
        raise JsonError("not valid JSON (a number is too long)") from None


def as_dict(value: Any, what: str) -> dict[str, Any]:
    """A parsed object as a dict, refusing repeated keys; nested objects stay ``Pairs``."""
    if not isinstance(value, Pairs):
        raise JsonError(f"{what} is not a JSON object")
    out: dict[str, Any] = {}
    for key, item in value:
        if key in out:
            raise JsonError(f"{what} has the key {clip(key)!r} twice")
        out[key] = item
    return out


def to_plain(value: Any, what: str) -> Any:
    """``value`` with every ``Pairs`` turned into a dict (repeated keys refused)."""
    if isinstance(value, Pairs):
        value = as_dict(value, what)
    if isinstance(value, dict):
        return {k: to_plain(v, what) for k, v in value.items()}
    if isinstance(value, list):
        return [to_plain(v, what) for v in value]
    return value


def read_object(path: Path, limit: int, what: str | None = None) -> dict[str, Any]:
    """A small JSON file that must hold an object (a config, an index), read with a size bound.

    Raises CheckpointError naming ``path``.
    """
    what = what or path.name
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read forever
            raise CheckpointError(str(path), f"{what} is not a regular file")
        if info.st_size > limit:
            raise CheckpointError(str(path), f"{what} is larger than the {limit}-byte limit")
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(str(path), f"cannot read {what}: {exc.strerror}") from exc
    try:
        return to_plain(as_dict(parse(utf8(raw)), what), what)
    except JsonError as exc:
        raise CheckpointError(str(path), f"malformed {what}: {exc}") from None
