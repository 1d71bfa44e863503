"""Finding the base a state was started from, by the path its manifest records.

States record the base's absolute path (and its fingerprint, which the Merger checks against
whatever base it is given). Older states recorded the path as typed: a relative one is read
from the current directory, with a note saying so.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from .errors import Notice, StateError
from .manifest import read_manifest


def recorded_base(state: str | Path) -> tuple[str, bool]:
    """The base path the state at ``state`` records, made absolute, and whether it exists.

    A relative path (an older state) is resolved against the current directory, with a
    :class:`Notice` saying so.
    """
    source = read_manifest(state)[0].base.source
    if source.startswith("<"):  # "<memory>": a state dict or module, not a file
        return source, False
    path = Path(source)
    if not path.is_absolute():
        path = Path(os.path.abspath(path))
        warnings.warn(
            f"{state} records its base as the relative path {source!r} (a state made by an "
            f"older contmerge): reading it from the current directory, {path}",
            Notice,
            stacklevel=2,
        )
    return str(path), path.exists()


def base_for(state: str | Path, given: str | None) -> str:
    """``given`` (``--base``) if any, else the recorded base; a clear error when it is gone."""
    if given is not None:
        return given
    path, exists = recorded_base(state)
    if not exists:
        raise StateError(missing_base(state, path))
    return path


def missing_base(state: str | Path, path: str) -> str:
    if path.startswith("<"):
        return (
            f"{state}: the state was started from an in-memory base ({path}), which has no "
            "path; give the base with --base PATH (its fingerprint is checked)"
        )
    return (
        f"{state}: the base this state was started from is not at its recorded path {path} "
        "(moved or deleted?); point --base to it, e.g. --base NEW/PATH (its fingerprint is "
        "checked against the state's)"
    )
