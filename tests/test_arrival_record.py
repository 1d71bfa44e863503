"""The manifest's arrival records as ``manifest.ArrivalRecord``: one writer, one reader, for
today's records and those of format-2 states (tests/data/state-v2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from contmerge import Merger
from contmerge.manifest import ArrivalRecord, read_manifest

from helpers import write_models

DATA = Path(__file__).parent / "data"


def test_a_format_2_states_records_read_and_write_back_unchanged(tmp_path) -> None:
    shutil.copytree(DATA / "state-v2", tmp_path / "v2")
    manifest, raw_bytes = read_manifest(tmp_path / "v2" / "state")
    assert manifest.format == "contmerge-state/2"
    records = manifest.arrivals
    assert [r.index for r in records] == [1, 2]
    assert records[0].source == "ft0.safetensors" and records[0].dtype is None  # v2 had none
    for record, raw in zip(records, json.loads(raw_bytes)["arrivals"]):
        assert list(record.to_json().items()) == list(raw.items())  # keys in the same order


def test_a_fold_writes_its_record_through_arrival_record(tmp_path) -> None:
    base, paths = write_models(tmp_path, 2)
    state = tmp_path / "state"
    with Merger(base, "average", state_dir=state) as merger:
        merger.fold(paths[0], weight=2.0)
        merger.fold(paths[1], name="second")
    raw = json.loads((state / "manifest.json").read_text())["arrivals"]
    first, second = (ArrivalRecord.from_json(r) for r in raw)
    assert (first.index, first.weight, first.dtype) == (1, 2.0, "F32")
    assert second.source == "second" and second.weight is None and "weight" not in raw[1]
    assert first.file is not None and first.seconds is not None and first.seconds >= 0
    for record, written in zip((first, second), raw):
        assert list(record.to_json().items()) == list(written.items())
