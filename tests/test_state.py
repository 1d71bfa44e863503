"""Durability of the state directory: resume, dedupe, locking, and crashes at any point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import contmerge.state
from contmerge import CheckpointError, Merger, StateError

from helpers import assert_same, merged_after, write_models


def test_resume_after_restart_equals_one_run(tmp_path):
    base, paths = write_models(tmp_path, 4)
    state = tmp_path / "state"
    with Merger(base, "opcm", state) as merger:
        merger.fold(paths[0])
        merger.fold(paths[1])
    with Merger(base, state_dir=state) as merger:  # the strategy comes from the manifest
        assert merger.count == 2
        merger.fold(paths[2])
        merger.fold(paths[3])
        resumed = merger.emit_state_dict()
    assert_same(resumed, merged_after(base, paths, "opcm"))


def test_manifest_records_every_arrival(tmp_path):
    base, paths = write_models(tmp_path, 3)
    state = tmp_path / "state"
    with Merger(base, "magmax(scaling_factor=0.4)", state) as merger:
        results = [merger.fold(p) for p in paths]
    manifest = json.loads((state / "manifest.json").read_text())
    assert manifest["strategy"] == "magmax(scaling_factor=0.4)"
    assert [a["index"] for a in manifest["arrivals"]] == [1, 2, 3]
    assert [a["source"] for a in manifest["arrivals"]] == [str(p) for p in paths]
    assert [a["hash"] for a in manifest["arrivals"]] == [r.content_hash for r in results]
    assert len(set(r.content_hash for r in results)) == 3
    assert manifest["globals"]["count"] == 3
    # exactly one state file: the one the manifest names
    files = sorted(p.name for p in state.glob("state-*"))
    assert files == [manifest["state_file"]]


def test_folding_the_same_checkpoint_twice_is_a_no_op(tmp_path):
    base, paths = write_models(tmp_path, 2)
    state = tmp_path / "state"
    with Merger(base, "average", state) as merger:
        merger.fold(paths[0])
        before = (state / "manifest.json").read_bytes()
        again = merger.fold(paths[0])
        assert again.status == "duplicate" and again.index == 1
        # the same weights in another format are the same checkpoint
        torch.save(load_file(paths[0]), tmp_path / "same.pt")
        assert merger.fold(tmp_path / "same.pt").status == "duplicate"
        assert (state / "manifest.json").read_bytes() == before
        assert merger.fold(paths[1]).status == "folded"
        assert merger.count == 2


def test_a_folded_checkpoint_can_be_deleted(tmp_path):
    base, paths = write_models(tmp_path, 2)
    state = tmp_path / "state"
    with Merger(base, "task_arithmetic", state) as merger:
        merger.fold(paths[0])
        merger.fold(paths[1])
    expected = merged_after(base, paths, "task_arithmetic")
    for path in paths:
        path.unlink()
    with Merger(base, state_dir=state) as merger:
        assert_same(merger.emit_state_dict(), expected)


def test_one_writer_per_state_directory(tmp_path):
    base, _ = write_models(tmp_path, 0)
    with Merger(base, "average", tmp_path / "state"):
        with pytest.raises(StateError, match="another process"):
            Merger(base, state_dir=tmp_path / "state")


def test_resume_refuses_another_strategy_or_base(tmp_path):
    base, paths = write_models(tmp_path, 1)
    with Merger(base, "opcm", tmp_path / "state") as merger:
        merger.fold(paths[0])
    with pytest.raises(StateError, match="made with opcm"):
        Merger(base, "magmax", tmp_path / "state")
    with pytest.raises(StateError, match="not the base"):
        Merger(paths[0], state_dir=tmp_path / "state")


def test_a_crash_before_the_manifest_commit_keeps_the_last_state(tmp_path, monkeypatch):
    base, paths = write_models(tmp_path, 2)
    state = tmp_path / "state"
    merger = Merger(base, "opcm", state)
    merger.fold(paths[0])
    good = merger.emit_state_dict()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut between the state file and the manifest")

    monkeypatch.setattr(contmerge.state, "atomic_write_bytes", crash)
    # a power cut runs no clean-up: the new generation's file stays under its name
    monkeypatch.setattr(contmerge.state._DiskStaging, "abort", lambda self: None)
    with pytest.raises(KeyboardInterrupt):
        merger.fold(paths[1])
    merger.close()
    monkeypatch.undo()
    assert len(list(state.glob("state-*"))) == 2  # the new generation was already renamed
    with Merger(base, state_dir=state) as reopened:
        assert reopened.count == 1
        assert_same(reopened.emit_state_dict(), good)
        assert len(list(state.glob("state-*"))) == 2  # opening deletes nothing
        reopened.fold(paths[1])  # its commit sweeps the orphan and takes its name
        assert len(list(state.glob("state-*"))) == 1
        assert_same(reopened.emit_state_dict(), merged_after(base, paths, "opcm"))


FOLDER = textwrap.dedent("""
    import sys
    import torch
    from contmerge import Merger
    torch.set_num_threads(1)  # as the test process: bitwise checks need one summation order
    base, state, *paths = sys.argv[1:]
    with Merger(base, "opcm", state) as merger:
        print("ready", flush=True)
        for path in paths:
            merger.fold(path)
            print("folded", path, flush=True)
""")


@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_a_loadable_state(tmp_path):
    base, paths = write_models(tmp_path, 6, scale=8)
    state = tmp_path / "state"
    script = tmp_path / "folder.py"
    script.write_text(FOLDER)
    # time one fold here and now, so the kills land inside folds however loaded the machine is
    with Merger(base, "opcm", tmp_path / "timing") as timer:
        timer.fold(paths[0])
        started = time.perf_counter()
        timer.fold(paths[1])
        fold_seconds = time.perf_counter() - started
    seen_counts: set[int] = set()
    # later fractions double until the kills have landed after at least two different commits
    # (a child's fold can take several of this process's: a fresh process, a loaded machine)
    fractions = [0.2, 0.9, 1.6, 2.3, 3.1, 4.4, *(4.4 * 2**k for k in range(1, 7))]
    for n, fraction in enumerate(fractions):
        if n >= 6 and len(seen_counts) >= 2:
            break
        proc = subprocess.Popen(
            [sys.executable, str(script), str(base), str(state), *map(str, paths)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(fraction * fold_seconds)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with Merger(base, state_dir=state) as merger:
            count = merger.count
            order = [Path(a.source) for a in merger.arrivals]
            assert order == paths[:count]
            assert_same(merger.emit_state_dict(), merged_after(base, paths[:count], "opcm"))
        seen_counts.add(count)
    # finish the run: everything pending is folded once, nothing twice
    with Merger(base, state_dir=state) as merger:
        results = [merger.fold(p) for p in paths]
        assert merger.count == len(paths)
        assert sum(r.status == "folded" for r in results) == len(paths) - max(seen_counts)
        assert_same(merger.emit_state_dict(), merged_after(base, paths, "opcm"))
    assert len(seen_counts) >= 2, f"kills landed at too few distinct points: {seen_counts}"


@pytest.mark.parametrize("header_bytes", [0x280, 0x480, 0x580])
def test_headers_whose_length_looks_like_a_pickle_opcode_still_read(tmp_path, header_bytes):
    """A header length of 0x480 starts the file with 80 04, the opening of pickle protocol 4."""
    from contmerge.tensorfile import SafetensorsReader

    tensors = {"w": torch.arange(16.0).reshape(4, 4)}
    for pad in range(header_bytes):
        save_file(tensors, tmp_path / "x.safetensors", metadata={"pad": "x" * pad})
        raw = (tmp_path / "x.safetensors").read_bytes()
        if int.from_bytes(raw[:8], "little") == header_bytes:
            break
    else:
        pytest.skip("could not hit the header length exactly")
    with SafetensorsReader(tmp_path / "x.safetensors") as reader:
        assert torch.equal(reader.read("w"), tensors["w"])


def test_without_dedupe_identical_arrivals_each_count(tmp_path):
    base, paths = write_models(tmp_path, 2)
    merger = Merger(base, "average", dedupe=False)
    for path in (paths[0], paths[0], paths[1]):
        assert merger.fold(path).status == "folded"
    a, c = load_file(paths[0]), load_file(paths[1])
    weighted = {n: (2 * a[n].double() + c[n].double()) / 3 for n in a if a[n].is_floating_point()}
    merged = merger.emit_state_dict()
    for name, value in weighted.items():
        torch.testing.assert_close(merged[name].double(), value, rtol=1e-6, atol=1e-6)


def test_an_unchanged_file_is_recognised_without_reading_it(tmp_path):
    base, paths = write_models(tmp_path, 1)
    with Merger(base, "opcm", tmp_path / "state") as merger:
        merger.fold(paths[0])
        record = merger.arrivals[0]
        assert record.file is not None and record.median_matrix_delta > 0
        # same inode, size and mtime, other bytes: recognised by identity, so never parsed
        stat = paths[0].stat()
        with open(paths[0], "r+b") as handle:
            handle.write(b"\xff" * stat.st_size)
        os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert merger.fold(paths[0]).status == "duplicate"
        # once the file visibly changed it is read again (and here refused)
        os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        with pytest.raises(CheckpointError):
            merger.fold(paths[0])
        assert merger.count == 1


def test_memory_store_never_reuses_a_buffer_the_new_state_still_holds() -> None:
    """Old generations become the next fold's output buffers, unless a rule's fold handed back
    its old state as the new one (then those tensors are live) — checked tensor by tensor."""
    from contmerge.state import MemoryStore
    from contmerge.tensorfile import TensorMeta

    meta = TensorMeta((4,), torch.float32)
    metas = {"a::value": meta, "b::value": meta}
    first = {"a": {"value": torch.zeros(4)}, "b": {"value": torch.zeros(4)}}
    store = MemoryStore({}, dict(first))
    staging = store.begin(metas)
    written_a = staging.target("a")  # folded into the buffers handed out
    written_a["value"].fill_(1.0)
    staging.write("a", written_a)
    staging.write("b", store.read("b"))  # a fold that returned its old state unchanged
    store.commit(staging, {})
    staging = store.begin(metas)
    reused_a, fresh_b = staging.target("a"), staging.target("b")
    assert reused_a["value"].data_ptr() == first["a"]["value"].data_ptr()  # the old generation
    live = store.read("b")["value"]
    assert fresh_b["value"].data_ptr() != live.data_ptr()  # never the live state
    assert store.holds("b", live) and not store.holds("a", reused_a["value"])


RACER = textwrap.dedent("""
    import os, sys, time
    from contmerge.cli import main
    go = sys.argv[1]
    print("ready", flush=True)
    while not os.path.exists(go):  # both start at once, imports done
        time.sleep(0.0005)
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.slow  # real processes started several times
def test_two_merges_creating_one_state_at_once_lose_no_fold(tmp_path):
    """Both find no manifest; only one may create the state. The other is refused, or resumes
    after it: every fold a process reported (exit 0) is in the state, none twice."""
    base, paths = write_models(tmp_path, 6, scale=8)  # creating the state takes a while
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    outcomes = set()
    for attempt in range(3):
        state, go = tmp_path / f"state{attempt}", tmp_path / f"go{attempt}"
        mine = [paths[:3], paths[3:]]
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), str(go), "merge", "--base", str(base)]
                + ["--strategy", "average", "--state", str(state), "--quiet", *map(str, ckpts)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for ckpts in mine
        ]
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        go.touch()
        results = [proc.communicate(timeout=600) for proc in procs]
        with Merger(base, state_dir=state) as merger:
            folded = [Path(a.source) for a in merger.arrivals]
            emitted = merger.emit_state_dict()
        assert len(set(folded)) == len(folded)
        for proc, (_, err), ckpts in zip(procs, results, mine):
            if proc.returncode == 0:
                assert all(c in folded for c in ckpts), (folded, err)
            else:
                assert "another process is folding into this state" in err, err
            outcomes.add(proc.returncode)
        assert 0 in (p.returncode for p in procs)
        assert_same(emitted, merged_after(base, folded, "average"))
    assert 1 in outcomes, "the two processes never overlapped: the race was not exercised"


def test_a_writer_that_lost_its_lock_cannot_overwrite_another_fold(tmp_path):
    base, paths = write_models(tmp_path, 3)
    state = tmp_path / "state"
    first = Merger(base, "average", state)
    first.fold(paths[0])
    (state / ".lock").unlink()  # someone cleans up "stale" lock files
    with Merger(base, state_dir=state) as second:  # locks a new .lock of its own
        second.fold(paths[1])
    with pytest.raises(StateError, match="lock file was deleted or replaced"):
        first.fold(paths[2])
    first.close()
    with Merger(base, state_dir=state) as merger:
        assert [Path(a.source) for a in merger.arrivals] == paths[:2]
        assert_same(merger.emit_state_dict(), merged_after(base, paths[:2], "average"))


def test_a_lost_lock_is_noticed_before_the_other_writer_commits(tmp_path):
    base, paths = write_models(tmp_path, 3)
    state = tmp_path / "state"
    first = Merger(base, "average", state)
    first.fold(paths[0])
    (state / ".lock").unlink()
    second = Merger(base, state_dir=state)  # open, not folding yet
    with pytest.raises(StateError, match="lock file was deleted or replaced"):
        first.fold(paths[1])
    first.close()
    second.fold(paths[2])  # the holder of the directory's lock folds as usual
    second.close()
    with Merger(base, state_dir=state) as merger:
        assert [Path(a.source) for a in merger.arrivals] == [paths[0], paths[2]]


def test_a_commit_over_a_manifest_changed_behind_its_back_is_refused(tmp_path):
    """Compare-and-swap: whoever changed the manifest (a writer that ignored the lock, a hand
    edit), the fold is refused rather than silently overwriting it."""
    base, paths = write_models(tmp_path, 2)
    state = tmp_path / "state"
    with Merger(base, "average", state) as merger:
        merger.fold(paths[0])
        manifest = json.loads((state / "manifest.json").read_text())
        manifest["arrivals"][0]["source"] = "renamed by hand"
        (state / "manifest.json").write_text(json.dumps(manifest))
        edited = (state / "manifest.json").read_bytes()
        with pytest.raises(StateError, match="changed since this process read it"):
            merger.fold(paths[1])
    assert (state / "manifest.json").read_bytes() == edited
    with Merger(base, state_dir=state) as merger:
        assert merger.count == 1
        assert merger.fold(paths[1]).status == "folded"
