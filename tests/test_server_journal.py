"""The journal read back: typed records (JournalRecord) over the same JSON lines, and a journal
written by an older server (lines built as dicts, before JournalRecord) still replaying.

The old lines below are built exactly as the server built them before its records were typed
(``git show f114eb7~1:contmerge/server/service.py`` and ``worker.py``): the same keys in the
same order, ``"client": null`` kept, a refusal without a label. The service that reads them is
the real one, on a real state, spool and inbox."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")

from safetensors.torch import save, save_file
from server_helpers import (
    STRATEGY,
    assert_same_model,
    finetune,
    make_base,
    sequential_fold,
    wait_for,
)

from contmerge import Merger
from contmerge.server.inbox import inspect_entry
from contmerge.server.journal import Arrival, Journal, JournalRecord
from contmerge.server.service import MergeService, ServeSettings


def old_accepted_upload(checkpoint_id: str, name: str, size: int, sha256: str) -> dict[str, Any]:
    # the pre-typed accept_upload: "client" written even when None
    return {
        "event": "accepted", "id": checkpoint_id, "origin": "http", "name": name,
        "label": f"upload/{checkpoint_id}/{name}", "bytes": size, "client": None,
        "sha256": sha256,
    }  # fmt: skip


def old_final(event: str, accepted: dict[str, Any], index: int, **more: Any) -> dict[str, Any]:
    # the pre-typed writer: arrival fields, the fold's fields, reason, then WorkItem.extra
    extra = {k: accepted[k] for k in ("sha256", "signature") if k in accepted}
    return {
        "event": event, "id": accepted["id"], "origin": accepted["origin"],
        "name": accepted["name"], "label": accepted["label"], "content_hash": "ab" * 32,
        "index": index, "seconds": 0.0123, **more, **extra,
    }  # fmt: skip


def stamped(record: dict[str, Any], second: int) -> dict[str, Any]:
    return {"time": f"2026-11-30T10:00:{second:02d}.000+00:00", **record}


def test_every_line_the_old_server_wrote_reads_back_as_the_same_json() -> None:
    accepted = old_accepted_upload("00000003-abcdef", "a.safetensors", 123, "cd" * 32)
    inbox_accepted = {
        "event": "accepted", "id": "00000004-fedcba", "origin": "inbox", "name": "i.safetensors",
        "label": "inbox/00000004-fedcba/i.safetensors", "signature": [10, 20, 30],
    }  # fmt: skip
    old_lines = [
        accepted,
        old_final("folded", accepted, 0),
        old_final("folded", accepted, 0, recovered=True),
        old_final("duplicate", inbox_accepted, 0, reason="same content as #0 (upload/x/y)"),
        inbox_accepted,
        {"event": "rejected", "id": "00000005-000000", "origin": "http", "name": "x" * 200,
         "reason": "upload of 9 bytes is over the limit of 8 bytes", "bytes": 9},
        {"event": "accepted", "id": "00000006-111111", "origin": "http", "name": "d",
         "label": "upload/00000006-111111/d", "bytes": 5, "recovered": True},
    ]  # fmt: skip
    for n, line in enumerate(old_lines):
        line = stamped(line, n)
        record = JournalRecord.from_json(line)
        assert record is not None, line
        # the same object: a null field left out, as every writer does now
        assert record.to_json() == {k: v for k, v in line.items() if v is not None}
    # a line that is no record of ours reads as none, not as an arrival with an empty id
    assert JournalRecord.from_json({"event": "queued", "id": "1", "origin": "http"}) is None
    assert JournalRecord.from_json({"event": "folded", "origin": "http"}) is None


def test_a_record_written_now_reads_back_equal(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.jsonl")
    arrival = Arrival.inbox("00000001-aaaaaa", "n.safetensors", [1, 2, 3])
    written = [
        journal.append(JournalRecord("accepted", arrival)),
        journal.append(
            JournalRecord("folded", arrival, content_hash="ef" * 32, index=4, seconds=0.5)
        ),
        journal.append(JournalRecord("rejected", Arrival("00000002-bbbbbb", "http", "z", None),
                                     reason="bad", bytes=7, client="127.0.0.1")),
    ]  # fmt: skip
    journal.close()
    assert all(r.time for r in written)
    assert list(Journal(tmp_path / "journal.jsonl").records()) == written
    on_disk = [json.loads(x) for x in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert on_disk == [r.to_json() for r in written]
    assert list(on_disk[0]) == ["time", "event", "id", "origin", "name", "label", "signature"]


def test_a_journal_of_an_older_server_replays(tmp_path: Path) -> None:
    """A restart on the disk an older server left: a spooled upload accepted and not folded is
    folded (its sha256 carried to the final line), one whose outcome was journaled is only
    cleared, an inbox entry journaled as folded but not moved is only moved, the old lines show
    in the status, and new ids continue after the journal's."""
    base_tensors = make_base()
    base = tmp_path / "base.safetensors"
    save_file(base_tensors, base)
    state, inbox = tmp_path / "state", tmp_path / "inbox"
    with Merger(base, STRATEGY, state):
        pass  # an existing state, as the older server left it
    spool = state / "spool"
    spool.mkdir()
    inbox.mkdir()

    a_id, b_id, i_id, r_id = "00000007-aaaaaa", "00000008-bbbbbb", "00000009-cccccc", "00000010-dd"
    a_body, b_body = save(finetune(base_tensors, 1)), save(finetune(base_tensors, 2))
    (spool / f"{a_id}__a.safetensors.safetensors").write_bytes(a_body)
    (spool / f"{b_id}__b.safetensors.safetensors").write_bytes(b_body)
    (inbox / "i.safetensors").write_bytes(save(finetune(base_tensors, 3)))
    signature, why = inspect_entry(inbox / "i.safetensors", inbox)
    assert signature is not None, why

    a = old_accepted_upload(a_id, "a.safetensors", len(a_body), "a1" * 32)
    b = old_accepted_upload(b_id, "b.safetensors", len(b_body), "b2" * 32)
    i = {
        "event": "accepted", "id": i_id, "origin": "inbox", "name": "i.safetensors",
        "label": f"inbox/{i_id}/i.safetensors", "signature": signature,
    }  # fmt: skip
    refused = {"event": "rejected", "id": r_id, "origin": "http", "name": "big.safetensors",
               "reason": "upload of 9 bytes is over the limit of 8 bytes"}  # fmt: skip
    lines = [a, b, old_final("folded", b, 0), i, old_final("folded", i, 1), refused]
    text = "".join(json.dumps(stamped(x, n)) + "\n" for n, x in enumerate(lines))
    (state / "journal.jsonl").write_text(text + '{"torn": tr')  # and a line cut by a crash

    service = MergeService(ServeSettings(state, str(base), STRATEGY, inbox=inbox,
                                         poll_interval=0.05))  # fmt: skip
    service.start()
    try:
        folded = wait_for(
            lambda: (s := service.upload_status(a_id)) and s["status"] == "folded" and s,
            what="the old accepted upload folded",
        )
        wait_for((inbox / "done" / "i.safetensors").exists, what="the inbox entry moved")
        assert folded["sha256"] == "a1" * 32  # carried from the old accepted line
        assert folded["label"] == f"upload/{a_id}/a.safetensors"
        assert service.upload_status(b_id)["status"] == "folded"  # the old line, as it was
        assert service.upload_status(r_id)["reason"] == refused["reason"]
        assert not list(spool.iterdir())  # B cleared without a fold, A folded and cleared
        manifest = service.manifest()
        assert [x["source"] for x in manifest["arrivals"]] == [f"upload/{a_id}/a.safetensors"]
        new = service.begin_upload("new.safetensors")
        assert new.id > r_id  # ids go on after the journal's
        new.abort()
    finally:
        service.stop()
        service.close()
    # the old lines are left as they were, the new ones appended after them
    after = (state / "journal.jsonl").read_text()
    assert after.startswith(text)
    [a_final] = [r for r in Journal(state / "journal.jsonl").records()
                 if r.arrival.id == a_id and r.final]  # fmt: skip
    assert a_final.event == "folded" and a_final.arrival.sha256 == "a1" * 32
    with Merger(base, state_dir=state) as merger:
        merged = merger.emit_state_dict()
    a_file = tmp_path / "a-again.safetensors"
    a_file.write_bytes(a_body)
    assert_same_model(merged, sequential_fold(base, STRATEGY, [a_file]))
