"""FW-Merging behind the doors that fold arrivals: each joins the pool and the FW step runs.

:class:`ServedFw` gives the merge server's writer thread (``contmerge.server.worker``) and the
Flower strategy (``contmerge.flower.fw``) what they use of a ``Merger`` — ``fold``,
``arrivals``, ``manifest``, ``count``, ``emit``, ``iter_merged`` — over a durable
:class:`~contmerge.fw_state.FwState`. The pool keeps a copy of each arrival in the state
directory (the spool file or inbox entry is cleared after the fold). An arrival the state
already holds under the same label is one committed before a crash and not yet journaled: the
writer records it as folded once (``recovered``), as for the other strategies. Iterations owed
when the server was stopped run when it starts again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .atomic import atomic_open
from .fw_state import FwState
from .sources import Checkpoint
from .tensorfile import write_safetensors


@dataclass(frozen=True)
class PoolEntry:
    """A pool member as the server lists it among the folded arrivals."""

    index: int  # 1-based
    source: str
    hash: str

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "source": self.source, "hash": self.hash}


@dataclass(frozen=True)
class ServedBase:
    source: str


@dataclass(frozen=True)
class FwManifest:
    """An FW state's manifest with the attributes of a ``manifest.Manifest`` the server reads
    (``server.worker.StateView``); ``to_json`` is its ``GET /manifest`` body."""

    strategy: str
    base: ServedBase
    generation: int
    arrivals: tuple[PoolEntry, ...]
    body: dict[str, Any]

    @property
    def count(self) -> int:
        return len(self.arrivals)

    def to_json(self) -> dict[str, Any]:
        return self.body


@dataclass
class ServedFold:
    """The part of ``merger.FoldResult`` the writer reads."""

    status: str  # "folded" | "duplicate"
    index: int
    content_hash: str
    seconds: float


class ServedFw:
    """An FW state opened by the server (its lock held for as long as it serves)."""

    strategy = SimpleNamespace(needs_extras=())  # arrivals come without statistics sidecars

    def __init__(
        self, state: Path, base: str, objective: str | None, hparams: dict[str, Any],
        model: str | None = None,
    ) -> None:  # fmt: skip
        self.state = FwState(state, base, objective, hparams or None, model=model)
        try:
            self.state.run_owed()
        except BaseException:
            self.state.close()
            raise

    def fold(self, arrival: str | Path | Checkpoint, name: str | None = None) -> ServedFold:
        """``arrival``: a file, or a checkpoint held in memory (a Flower reply), which is
        written into the state first."""
        started = time.perf_counter()
        label = name or str(getattr(arrival, "source", arrival))
        if isinstance(arrival, Checkpoint):
            path = self.state.store.directory / "incoming.safetensors"
            with atomic_open(path) as handle:
                write_safetensors(handle, ((n, arrival.read(n)) for n in arrival.meta))
            try:
                (result,) = self.state.fold([path], [label], keep_copies=True)
            finally:
                path.unlink(missing_ok=True)
        else:
            (result,) = self.state.fold([arrival], [label], keep_copies=True)
        status = "folded" if result.status == "joined" else "duplicate"
        return ServedFold(status, result.index + 1, result.hash, time.perf_counter() - started)

    @property
    def arrivals(self) -> list[PoolEntry]:
        return [
            PoolEntry(i + 1, r["source"], r["hash"])
            for i, r in enumerate(self.state.manifest["pool"])
        ]

    @property
    def count(self) -> int:
        return len(self.state.manifest["pool"])

    @property
    def manifest(self) -> FwManifest:
        """The state's manifest with the fields the status page and metrics read."""
        raw, arrivals = self.state.manifest, tuple(self.arrivals)
        body = {
            **raw,
            "strategy": "fw",
            "base": {**raw["base"], "source": raw["base"]["path"]},
            "globals": {"count": len(arrivals), "iteration": raw["iteration"]},
            "arrivals": [a.to_json() for a in arrivals],
        }
        base = ServedBase(raw["base"]["path"])
        # a new state has no generation before its first commit (which is generation 0)
        return FwManifest("fw", base, int(raw.get("generation", 0)), arrivals, body)

    def emit(self, path: str | Path, out_dtype: Any = None) -> Path:
        if out_dtype is not None:
            from .errors import SettingError

            raise SettingError("--out-dtype: an FW state emits the base's dtypes")
        return self.state.emit(path)

    def iter_merged(self) -> Iterator[tuple[str, Any]]:
        """The current θ in the base's dtypes, tensor by tensor."""
        return iter(self.state.merger.merged().items())

    def close(self) -> None:
        self.state.close()
