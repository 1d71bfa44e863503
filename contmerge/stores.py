"""What a fold asks of the state it folds into: the ``Store`` and ``Staging`` protocols.

``state.MemoryStore`` and ``state.DiskStore`` are the two stores. A fold reads the current state
one tensor at a time (``view`` in place, ``read`` as tensors it may keep), writes the new state
into a ``Staging`` begun for it, and either commits it with the next manifest (one atomic step)
or aborts it (the current state untouched).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from .manifest import Manifest
from .strategy import State
from .tensorfile import TensorMeta


class Staging(Protocol):
    """The new state of one fold (or one group of folds), tensor by tensor, until committed."""

    def target(self, name: str) -> State:
        """Buffers for ``name``'s new state that a fold may write into, as the store keeps it."""
        ...

    def write(self, name: str, state: State) -> None:
        """``name``'s new state (``target``'s buffers, or tensors of the rule's own)."""
        ...

    def abort(self) -> None:
        """Drop everything written: the store keeps its current state."""
        ...


class Store(Protocol):
    """A merge state: its manifest and its state tensors, read lazily, committed atomically."""

    #: the state's directory (None in memory)
    path: Path | None
    #: the committed manifest
    manifest: Manifest

    def read(self, name: str) -> State: ...

    def view(self, name: str) -> State:
        """``name``'s current state in place (valid until ``release``)."""
        ...

    def release(self, name: str) -> None: ...

    def holds(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` shares a buffer a later fold will overwrite (copy it out)."""
        ...

    def begin(self, metas: Mapping[str, TensorMeta]) -> Staging: ...

    def commit(self, staging: Any, manifest: Manifest) -> None:
        """Make ``staging`` the current state and ``manifest`` the manifest, in one step."""
        ...

    def begin_check(self) -> None: ...

    def end_check(self) -> None: ...

    def close(self) -> None: ...
