"""The manifest of a state directory: one typed ``Manifest``, read by ``Manifest.from_json`` and
written by ``Manifest.to_json`` (nothing else reads or writes its keys).

Every field is checked when the manifest is read, so a damaged or hand-edited manifest gives one
line naming the file and what is wrong, never a traceback, and never a state file outside the
directory (``state_file`` must be the plain name of the generation's file).

Formats: ``contmerge-state/3`` is written; ``contmerge-state/2`` (no ``run``, no ``checksum``) is
read as a ``Manifest`` whose ``run`` and ``checksum`` are None, and the next commit writes it as
format 3 (``DiskStore.commit``). The typed manifest writes the same JSON format 3 always had, so
the format stays 3: a contmerge that reads 3 reads what this one writes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import StateError

MANIFEST = "manifest.json"
#: 3: each generation's checksum and the run it belongs to are recorded
FORMAT = "contmerge-state/3"
#: 2 had no checksums: read as is, upgraded to 3 by the next commit
FORMATS = ("contmerge-state/2", FORMAT)
_STATE_FILE = re.compile(r"state-(\d{8})\.safetensors")

_Number = (int, float)
#: required fields and their JSON types (bool is not an integer here)
_TOP: dict[str, Any] = {
    "strategy": str,
    "base": dict,
    "globals": dict,
    "arrivals": list,
    "generation": int,
    "state_file": str,
}
_BASE = {"source": str, "fingerprint": str, "tensors": int, "linear_weights": int}
_ARRIVAL = {"index": int, "hash": str, "source": str, "folded_at": str, "relative_delta": _Number}
_CHECKSUM = {"algorithm": str, "bytes": int, "header": str, "content": str}


@dataclass(frozen=True)
class ArrivalRecord:
    """One folded arrival as the manifest records it (``arrivals[index - 1]``).

    Written by ``to_json`` alone, read by ``from_json``, which takes the records of every
    format this version reads (a format-2 state's lack ``dtype``; older ones also ``file``,
    ``median_matrix_delta`` and ``seconds``: None)."""

    index: int  # 1-based position among folded arrivals
    hash: str  # content hash (``contmerge.hashing``)
    source: str  # the arrival's label: its path, or the name it was given
    relative_delta: float  # ‖θ_t − θ0‖ / ‖θ0‖ over every float tensor
    folded_at: str  # ISO 8601, UTC, to the second
    file: str | None = None  # identity of the file folded (``identity.file_identity``)
    median_matrix_delta: float | None = None
    dtype: str | None = None  # the arrival's dtypes (``dtypes.dtype_summary``)
    weight: float | None = None  # the per-arrival weight, when one was given
    seconds: float | None = None  # how long its fold took

    def to_json(self) -> dict[str, Any]:
        """The manifest's object, keys in their order on disk; ``file`` is always written
        (null: dedupe was off), the other optional fields only when known."""
        optional = {
            "median_matrix_delta": self.median_matrix_delta,
            "dtype": self.dtype,
            "weight": self.weight,
        }
        return {
            "index": self.index,
            "hash": self.hash,
            "source": self.source,
            "file": self.file,
            "relative_delta": self.relative_delta,
            **{k: v for k, v in optional.items() if v is not None},
            "folded_at": self.folded_at,
            **({} if self.seconds is None else {"seconds": self.seconds}),
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> ArrivalRecord:
        """A record ``Manifest.from_json`` checked (its required fields are there)."""
        return cls(
            index=record["index"],
            hash=record["hash"],
            source=record["source"],
            relative_delta=record["relative_delta"],
            folded_at=record["folded_at"],
            file=record.get("file"),
            median_matrix_delta=record.get("median_matrix_delta"),
            dtype=record.get("dtype"),
            weight=record.get("weight"),
            seconds=record.get("seconds"),
        )


@dataclass(frozen=True)
class KnownBase:
    """What a later open of the unchanged base takes instead of reading it (``base.record``):
    the identity of its files, its linear weights and ‖θ0‖² per float tensor."""

    identity: str
    linear: tuple[str, ...]
    sum_sq: Mapping[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"identity": self.identity, "linear": list(self.linear), "sum_sq": dict(self.sum_sq)}

    @classmethod
    def from_json(cls, record: Any) -> KnownBase | None:
        """None for a malformed record (hand-edited): the base is then read, and recorded anew
        by the next commit, so a bad record is never an error."""
        if not isinstance(record, dict):
            return None
        identity, linear, sum_sq = (
            record.get("identity"),
            record.get("linear"),
            record.get("sum_sq"),
        )
        if (
            not isinstance(identity, str)
            or not isinstance(linear, list)
            or not all(isinstance(n, str) for n in linear)
            or not isinstance(sum_sq, dict)
            or not all(type(v) in (int, float) for v in sum_sq.values())
        ):
            return None
        return cls(identity, tuple(linear), dict(sum_sq))


@dataclass(frozen=True)
class BaseRecord:
    """The base a state was started from (``base``)."""

    source: str  # its path (absolute), or "<memory>"
    fingerprint: str  # ``BaseTensors.fingerprint``: checked against any base given
    tensors: int
    linear_weights: int
    record: KnownBase | None = None

    def to_json(self) -> dict[str, Any]:
        fields = {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "tensors": self.tensors,
            "linear_weights": self.linear_weights,
        }
        return fields if self.record is None else {**fields, "record": self.record.to_json()}

    @classmethod
    def from_json(cls, base: Mapping[str, Any]) -> BaseRecord:
        return cls(
            base["source"],
            base["fingerprint"],
            base["tensors"],
            base["linear_weights"],
            KnownBase.from_json(base.get("record")),
        )


@dataclass(frozen=True)
class Checksum:
    """The current generation's file as it was written (``checksum``, format 3)."""

    algorithm: str
    bytes: int
    header: str  # xxh3-128 of the length prefix and header
    content: str  # ``hashing.ContentHash`` of every state tensor

    def to_json(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "bytes": self.bytes,
            "header": self.header,
            "content": self.content,
        }

    @classmethod
    def from_json(cls, checksum: Mapping[str, Any]) -> Checksum:
        fields = ("algorithm", "bytes", "header", "content")
        return cls(*(checksum[key] for key in fields))


@dataclass(frozen=True)
class Manifest:
    """A merge state's manifest. Changed by ``dataclasses.replace``, never in place: the server's
    threads share the one last committed."""

    strategy: str  # the rule's spec, settings included
    base: BaseRecord
    globals: dict[str, Any]  # the strategy's globals, and ``count``
    arrivals: tuple[ArrivalRecord, ...]
    generation: int
    linear_pattern: str | None = None
    created: str | None = None
    state_file: str | None = None  # None: a state in memory
    run: str | None = None  # None: in memory, or a format-2 state before its next commit
    checksum: Checksum | None = None  # None: in memory, or format 2
    format: str = FORMAT

    @property
    def count(self) -> int:
        """Arrivals folded (``globals.count``)."""
        return int(self.globals["count"])

    def to_json(self) -> dict[str, Any]:
        """The manifest's object, keys in their order on disk; the optional ones when known."""
        optional = {"created": self.created, "run": self.run, "state_file": self.state_file}
        return {
            "format": self.format,
            "strategy": self.strategy,
            "linear_pattern": self.linear_pattern,
            "base": self.base.to_json(),
            "globals": dict(self.globals),
            "arrivals": [record.to_json() for record in self.arrivals],
            "generation": self.generation,
            **{k: v for k, v in optional.items() if v is not None},
            **({} if self.checksum is None else {"checksum": self.checksum.to_json()}),
        }

    @classmethod
    def from_json(cls, manifest: Any, path: str | Path) -> Manifest:
        """The manifest of the JSON value ``manifest`` read from ``path``, of any format this
        version reads; StateError naming ``path`` and what is wrong."""
        if not isinstance(manifest, dict):
            raise _corrupt(path, f"a JSON {_json_type(manifest)}, not an object")
        if manifest.get("format") not in FORMATS:
            raise StateError(
                f"{path}: unknown state format {manifest.get('format')!r} "
                f"(this contmerge reads {', '.join(FORMATS)})"
            )
        problem = _problem(manifest)
        if problem:
            raise _corrupt(path, problem)
        # the migration of format 2: it has no run and no checksum (anything under those keys
        # was hand-added and is not trusted); its next commit records both, as format 3
        current = manifest["format"] == FORMAT
        return cls(
            strategy=manifest["strategy"],
            base=BaseRecord.from_json(manifest["base"]),
            globals=dict(manifest["globals"]),
            arrivals=tuple(ArrivalRecord.from_json(r) for r in manifest["arrivals"]),
            generation=manifest["generation"],
            # null, or absent in a hand-edited manifest: no pattern (as a new state records it)
            linear_pattern=manifest.get("linear_pattern"),
            created=manifest.get("created"),
            state_file=manifest["state_file"],
            run=manifest["run"] if current else None,
            checksum=Checksum.from_json(manifest["checksum"]) if current else None,
            format=manifest["format"],
        )

    def folded(self, record: ArrivalRecord, globals_: Mapping[str, Any]) -> Manifest:
        """This manifest with ``record`` folded after the others, the strategy's new globals and
        the next generation."""
        return replace(
            self,
            globals={**globals_, "count": record.index},
            arrivals=(*self.arrivals, record),
            generation=self.generation + 1,
        )


def state_file_name(generation: int) -> str:
    return f"state-{generation:08d}.safetensors"


def is_state_file(name: str) -> bool:
    return _STATE_FILE.fullmatch(name) is not None


def read_manifest(directory: str | Path) -> tuple[Manifest, bytes]:
    """The checked manifest of a state directory and its bytes (for compare-and-swap)."""
    path = Path(directory) / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise StateError(f"{directory}: no {MANIFEST}; not a contmerge state directory") from exc
    except OSError as exc:
        raise StateError(f"{path}: cannot read the manifest: {exc.strerror}") from exc
    return parse_manifest(path, raw), raw


def parse_manifest(path: Path, raw: bytes) -> Manifest:
    """``raw``, the bytes of the manifest at ``path``, as text, as JSON, then as a Manifest."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        reason = f"not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x})"
        raise _corrupt(path, reason) from exc
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        reason = f"not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})"
        raise _corrupt(path, reason) from exc
    return Manifest.from_json(manifest, path)


def dump_manifest(manifest: Manifest) -> bytes:
    return json.dumps(manifest.to_json(), indent=2, sort_keys=False).encode() + b"\n"


def _corrupt(path: str | Path, reason: str) -> StateError:
    return StateError(f"{path}: corrupt manifest: {reason}")


def _problem(manifest: Mapping[str, Any]) -> str | None:
    """What is wrong with a manifest's fields, or None."""
    problem = _fields(manifest, _TOP, "") or _fields(manifest["base"], _BASE, "base.")
    if problem:
        return problem
    if not _is(manifest["globals"].get("count"), int):
        return "globals.count is missing or not an integer"
    for position, arrival in enumerate(manifest["arrivals"]):
        where = f"arrivals[{position}]"
        if not isinstance(arrival, dict):
            return f"{where} is a JSON {_json_type(arrival)}, not an object"
        problem = _fields(arrival, _ARRIVAL, f"{where}.")
        if problem:
            return problem
        if arrival["index"] != position + 1:
            return f"{where}.index is {arrival['index']}, expected {position + 1}"
    for key in ("linear_pattern", "created"):  # optional: null or absent when there is none
        value = manifest.get(key)
        if value is not None and not isinstance(value, str):
            return f"{key} is a JSON {_json_type(value)}, expected a string or null"
    count = manifest["globals"]["count"]
    if count != len(manifest["arrivals"]):
        return f"globals.count is {count} but {len(manifest['arrivals'])} arrivals are recorded"
    generation, name = manifest["generation"], manifest["state_file"]
    if generation < 0:
        return f"generation {generation} is negative"
    if not is_state_file(name):
        return f"state_file {name!r} is not a plain state file name (state-<8 digits>.safetensors)"
    if name != state_file_name(generation):
        return f"state_file {name!r} is not generation {generation}'s file"
    if manifest["format"] != FORMAT:
        return None
    if not _is(manifest.get("run"), str):
        return "run is missing or not a string"
    if not isinstance(manifest.get("checksum"), dict):
        return "checksum is missing or not an object"
    return _fields(manifest["checksum"], _CHECKSUM, "checksum.")


def _is(value: Any, kind: Any) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def _fields(obj: Mapping[str, Any], spec: Mapping[str, Any], where: str) -> str | None:
    for key, kind in spec.items():
        if key not in obj:
            return f"missing key {where}{key}"
        if not _is(obj[key], kind):
            return f"{where}{key} is a JSON {_json_type(obj[key])}, expected {_kind_name(kind)}"
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "list"}.get(
        type(value), "object"
    )


def _kind_name(kind: Any) -> str:
    return {str: "a string", int: "an integer", dict: "an object", list: "a list"}.get(
        kind, "a number"
    )
