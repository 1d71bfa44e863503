"""The manifest of a state directory: read, checked field by field, and written.

Every field the engine and the CLI use is checked when the manifest is read, so a damaged or
hand-edited manifest gives one line naming the file and what is wrong, never a traceback, and
never a state file outside the directory (``state_file`` must be the plain name of the
generation's file).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
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
        """A record of a manifest ``parse_manifest`` checked (its required fields are there)."""
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


def arrival_records(manifest: Mapping[str, Any]) -> list[ArrivalRecord]:
    return [ArrivalRecord.from_json(r) for r in manifest["arrivals"]]


def state_file_name(generation: int) -> str:
    return f"state-{generation:08d}.safetensors"


def is_state_file(name: str) -> bool:
    return _STATE_FILE.fullmatch(name) is not None


def read_manifest(directory: str | Path) -> tuple[dict[str, Any], bytes]:
    """The checked manifest of a state directory and its bytes (for compare-and-swap)."""
    path = Path(directory) / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise StateError(f"{directory}: no {MANIFEST}; not a contmerge state directory") from exc
    except OSError as exc:
        raise StateError(f"{path}: cannot read the manifest: {exc.strerror}") from exc
    return parse_manifest(path, raw), raw


def parse_manifest(path: Path, raw: bytes) -> dict[str, Any]:
    def corrupt(reason: str) -> StateError:
        return StateError(f"{path}: corrupt manifest: {reason}")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise corrupt(f"not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x})") from exc
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise corrupt(f"not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") from exc
    if not isinstance(manifest, dict):
        raise corrupt(f"a JSON {_json_type(manifest)}, not an object")
    if manifest.get("format") not in FORMATS:
        raise StateError(
            f"{path}: unknown state format {manifest.get('format')!r} "
            f"(this contmerge reads {', '.join(FORMATS)})"
        )
    problem = _problem(manifest)
    if problem:
        raise corrupt(problem)
    return manifest


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


def dump_manifest(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=False).encode() + b"\n"
