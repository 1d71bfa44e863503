"""``manifest.Manifest``: one reader (``from_json``), one writer (``to_json``), the formats it
reads (2, migrated by the next commit; 3), and the one-line error for each damaged field."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from contmerge import Merger
from contmerge.errors import StateError
from contmerge.manifest import FORMAT, FORMATS, Manifest, dump_manifest, parse_manifest

from helpers import write_models

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def folded(tmp_path_factory) -> tuple[Path, list[Path], Path]:
    """A format-3 state of ``average`` over two arrivals (one with a weight)."""
    root = tmp_path_factory.mktemp("manifest")
    base, paths = write_models(root, 3)
    state = root / "state"
    with Merger(base, "average", state_dir=state) as merger:
        merger.fold(paths[0], weight=2.0)
        merger.fold(paths[1], name="second")
    return base, paths, state


def raw_of(state: Path) -> dict[str, Any]:
    return json.loads((state / "manifest.json").read_bytes())


def test_a_manifest_reads_into_typed_fields_and_writes_back_byte_for_byte(folded) -> None:
    _, paths, state = folded
    raw = (state / "manifest.json").read_bytes()
    manifest = parse_manifest(state / "manifest.json", raw)
    assert manifest.format == FORMAT and manifest.strategy == "average()"
    assert manifest.count == 2 and manifest.generation == 2
    assert manifest.state_file == "state-00000002.safetensors"
    assert manifest.run is not None and manifest.checksum is not None
    assert manifest.checksum.bytes == (state / manifest.state_file).stat().st_size
    assert manifest.base.record is not None and manifest.base.tensors > 0
    assert [a.source for a in manifest.arrivals] == [str(paths[0].resolve()), "second"]
    assert manifest.arrivals[0].weight == 2.0 and manifest.arrivals[1].weight is None
    # the typed manifest writes what was on disk, keys in the same order: the format stays 3
    assert dump_manifest(manifest) == raw
    assert list(manifest.to_json()) == list(json.loads(raw))


def test_a_manifest_is_changed_by_replacing_it_never_in_place(folded) -> None:
    _, _, state = folded
    manifest = parse_manifest(state / "manifest.json", (state / "manifest.json").read_bytes())
    with pytest.raises(dataclasses.FrozenInstanceError):
        manifest.generation = 7  # type: ignore[misc]
    record = dataclasses.replace(manifest.arrivals[-1], index=3, source="third")
    after = manifest.folded(record, {**manifest.globals, "weight_sum": 4.0})
    assert (after.count, after.generation, after.arrivals[-1].source) == (3, 3, "third")
    assert after.globals["weight_sum"] == 4.0
    assert (manifest.count, manifest.generation, len(manifest.arrivals)) == (2, 2, 2)


def test_a_format_2_manifest_is_read_as_is_and_upgraded_by_the_next_commit(tmp_path) -> None:
    data = tmp_path / "v2"
    shutil.copytree(DATA / "state-v2", data)
    state = data / "state"
    raw = (state / "manifest.json").read_bytes()
    old = parse_manifest(state / "manifest.json", raw)
    assert old.format == "contmerge-state/2" == FORMATS[0]
    assert old.run is None and old.checksum is None and old.base.record is None
    assert dump_manifest(old) == raw  # read and written back, nothing added or lost
    with Merger(data / "base.safetensors", state_dir=state) as merger:
        merger.fold(data / "ft2.safetensors")
        new = merger.manifest
    assert new.format == FORMAT and new.run is not None and new.checksum is not None
    assert new.base.record is not None  # the base's record, written with the upgrade
    assert new.arrivals[:2] == old.arrivals  # the old records, unchanged
    assert parse_manifest(state / "manifest.json", (state / "manifest.json").read_bytes()) == new


def test_a_state_in_memory_has_a_manifest_with_no_file_run_or_checksum(tmp_path) -> None:
    base, paths = write_models(tmp_path, 1)
    with Merger(base, "task_arithmetic") as merger:
        merger.fold(paths[0])
        manifest = merger.manifest
    assert (manifest.state_file, manifest.run, manifest.checksum) == (None, None, None)
    written = manifest.to_json()
    assert {"state_file", "run", "checksum"}.isdisjoint(written)
    assert written["arrivals"][0]["index"] == 1 and written["globals"]["count"] == 1


def _set(raw: Any, dotted: str, value: Any) -> None:
    """``value`` at the ``dotted`` path (``arrivals.0.hash``), or the key dropped (``_DROP``)."""
    *parents, last = dotted.split(".")
    for part in parents:
        raw = raw[int(part)] if isinstance(raw, list) else raw[part]
    key: Any = int(last) if isinstance(raw, list) else last
    if value is _DROP:
        del raw[key]
    else:
        raw[key] = value


_DROP = object()

#: (field, value given it (or dropped), what the one line says)
DAMAGE = [
    ("strategy", _DROP, "missing key strategy"),
    ("strategy", 3, "strategy is a JSON number, expected a string"),
    ("base", [], "base is a JSON list, expected an object"),
    ("base.source", _DROP, "missing key base.source"),
    ("base.fingerprint", None, "base.fingerprint is a JSON null, expected a string"),
    ("base.tensors", "11", "base.tensors is a JSON string, expected an integer"),
    ("base.linear_weights", 2.0, "base.linear_weights is a JSON number, expected an integer"),
    ("globals", "x", "globals is a JSON string, expected an object"),
    ("globals.count", True, "globals.count is missing or not an integer"),
    ("globals.count", 5, "globals.count is 5 but 2 arrivals are recorded"),
    ("arrivals", {}, "arrivals is a JSON object, expected a list"),
    ("arrivals.0", "a", "arrivals[0] is a JSON string, not an object"),
    ("arrivals.0.index", 2, "arrivals[0].index is 2, expected 1"),
    ("arrivals.1.hash", _DROP, "missing key arrivals[1].hash"),
    ("arrivals.1.source", 1, "arrivals[1].source is a JSON number, expected a string"),
    ("arrivals.0.folded_at", _DROP, "missing key arrivals[0].folded_at"),
    ("arrivals.0.relative_delta", "0.1", "arrivals[0].relative_delta is a JSON string, "),
    ("generation", -1, "generation -1 is negative"),
    ("generation", False, "generation is a JSON boolean, expected an integer"),
    ("generation", 3, "state_file 'state-00000002.safetensors' is not generation 3's file"),
    (
        "state_file",
        "../state-00000002.safetensors",
        "state_file '../state-00000002.safetensors' is not a plain state file name",
    ),
    ("state_file", _DROP, "missing key state_file"),
    ("linear_pattern", 5, "linear_pattern is a JSON number, expected a string or null"),
    ("created", ["x"], "created is a JSON list, expected a string or null"),
    ("run", _DROP, "run is missing or not a string"),
    ("checksum", "abc", "checksum is missing or not an object"),
    ("checksum.bytes", "12", "checksum.bytes is a JSON string, expected an integer"),
    ("checksum.header", _DROP, "missing key checksum.header"),
]


@pytest.mark.parametrize("dotted, value, reason", DAMAGE, ids=[f"{d[0]}={d[1]!r}" for d in DAMAGE])
def test_each_damaged_field_is_one_line_naming_the_file_and_the_field(
    folded, dotted, value, reason
) -> None:
    _, _, state = folded
    raw = copy.deepcopy(raw_of(state))
    _set(raw, dotted, value)
    path = state / "manifest.json"
    with pytest.raises(StateError) as refused:
        parse_manifest(path, json.dumps(raw).encode())
    message = str(refused.value)
    assert message.startswith(f"{path}: corrupt manifest: {reason}"), message
    assert "\n" not in message


@pytest.mark.parametrize("found", ["contmerge-state/1", "contmerge-state/4", None, 3])
def test_a_format_this_version_does_not_read_is_named_with_those_it_does(folded, found) -> None:
    _, _, state = folded
    raw = {**raw_of(state), "format": found}
    with pytest.raises(StateError, match="unknown state format") as refused:
        Manifest.from_json(raw, state / "manifest.json")
    assert str(refused.value) == (
        f"{state / 'manifest.json'}: unknown state format {found!r} "
        "(this contmerge reads contmerge-state/2, contmerge-state/3)"
    )


def test_a_format_2_manifest_needs_no_run_or_checksum_but_its_other_fields_are_checked(
    folded,
) -> None:
    _, _, state = folded
    raw = {k: v for k, v in raw_of(state).items() if k not in ("run", "checksum")}
    path = state / "manifest.json"
    v2 = Manifest.from_json({**raw, "format": "contmerge-state/2"}, path)
    assert v2.run is None and v2.checksum is None and v2.arrivals[1].source == "second"
    # a run or checksum hand-added to a format-2 manifest is not taken
    added = {**raw, "format": "contmerge-state/2", "run": 5, "checksum": {"bytes": "x"}}
    assert Manifest.from_json(added, path) == v2
    with pytest.raises(StateError, match="run is missing or not a string"):
        Manifest.from_json(raw, path)  # format 3 without them
    with pytest.raises(StateError, match="missing key base.tensors"):
        broken = copy.deepcopy(raw)
        del broken["base"]["tensors"]
        Manifest.from_json({**broken, "format": "contmerge-state/2"}, path)


@pytest.mark.parametrize(
    "record",
    [
        {"identity": "x", "linear": "encoder.0.weight", "sum_sq": {}},
        {"identity": 1, "linear": [], "sum_sq": {}},
        {"identity": "x", "linear": [], "sum_sq": {"a": "1.0"}},
        {"identity": "x", "linear": [], "sum_sq": {"a": True}},
        [],
    ],
)
def test_a_malformed_base_record_is_no_record_not_an_error(folded, record) -> None:
    _, _, state = folded
    raw = raw_of(state)
    raw["base"]["record"] = record
    manifest = Manifest.from_json(raw, state / "manifest.json")
    assert manifest.base.record is None  # the base is read, and recorded by the next commit
    assert "record" not in manifest.to_json()["base"]
