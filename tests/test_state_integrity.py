"""The state directory under damage and tampering: a manifest naming another file, corrupt
manifests, flipped bytes, swapped files, read-only directories, states of older formats.
Nothing is ever deleted or written by a refused or read-only command."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from contmerge import Merger, StateError
from contmerge.cli import main

from helpers import assert_float32_close, assert_same, merged_after, write_models

DATA = Path(__file__).parent / "data"


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root``: its bytes and mtime (what a command must not change)."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def folded(tmp_path):
    """A state of generation 3 (three folds) in ``runs/state``, with its checkpoints."""
    base, paths = write_models(tmp_path, 3)
    state = tmp_path / "runs" / "state"
    with Merger(base, "average", state) as merger:
        for path in paths:
            merger.fold(path)
    return base, paths, state


def commands(base: Path, state: Path, out: Path, checkpoint: Path) -> list[list[str]]:
    return [
        ["emit", "--state", str(state), "--base", str(base), "--out", str(out)],
        ["inspect", "--state", str(state)],
        ["verify", "--state", str(state), "--base", str(base)],
        ["merge", "--base", str(base), "--state", str(state), "--quiet", str(checkpoint)],
    ]


def assert_every_command_refuses(folded, tmp_path: Path, capsys, *expected: str) -> None:
    """emit, inspect, verify and merge each exit 1 with one line holding ``expected``, and
    leave every file as it was (nothing deleted or written, no output)."""
    base, paths, state = folded
    before = snapshot(tmp_path)
    for command in commands(base, state, tmp_path / "out.safetensors", paths[0]):
        assert main(command) == 1, command
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert all(text in err for text in expected), err
    assert snapshot(tmp_path) == before


def edit_manifest(state: Path, **changes) -> None:
    manifest = json.loads((state / "manifest.json").read_text())
    manifest.update(changes)
    (state / "manifest.json").write_text(json.dumps(manifest, indent=2))


@pytest.mark.parametrize(
    "named",
    [
        "state-00000002.safetensors",  # another generation (whose file is the spare's by now)
        "../../outside-file.safetensors",
        "/etc/hostname",
        "sub/state-00000003.safetensors",
        "state-3.safetensors",
    ],
)
def test_a_manifest_naming_another_file_deletes_nothing(folded, tmp_path, named, capsys):
    base, paths, state = folded
    shutil.copy(state / "state-00000003.safetensors", tmp_path / "outside-file.safetensors")
    edit_manifest(state, state_file=named)
    manifest = state / "manifest.json"
    assert_every_command_refuses(
        folded, tmp_path, capsys, f"{manifest}: corrupt manifest: state_file {named!r}"
    )


def test_read_only_commands_write_and_delete_nothing(folded, tmp_path, capsys):
    base, paths, state = folded
    # leftovers of a fold that was killed: a reader must leave them for the next writer
    (state / ".state-0123abcd.tmp").write_bytes(b"partial")
    (state / "state-00000004.safetensors").write_bytes(b"published, never committed")
    before = snapshot(state)
    out = tmp_path / "emitted"
    assert main(["emit", "--state", str(state), "--out", str(out / "m.safetensors")]) == 0
    assert main(["inspect", "--state", str(state)]) == 0
    assert main(["inspect", "--state", str(state), "--json"]) == 0
    assert main(["verify", "--state", str(state)]) == 0
    assert snapshot(state) == before
    assert_same(load_file(out / "m.safetensors"), merged_after(base, paths, "average"))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (b'{"format": "contmerge-state/3", \xff\xfe}', "not UTF-8 text (byte 32 is 0xff)"),
        (b'{"format": "contmerge-state/3", "strategy": ', "not valid JSON (Expecting value"),
        (b"[1, 2, 3]", "a JSON list, not an object"),
        (b'"just a string"', "a JSON string, not an object"),
        (b"", "not valid JSON"),
    ],
)
def test_a_corrupt_manifest_is_one_line_naming_it(folded, tmp_path, damage, reason, capsys):
    base, paths, state = folded
    (state / "manifest.json").write_bytes(damage)
    manifest = state / "manifest.json"
    expected = f"{manifest}: corrupt manifest: {reason}"
    assert_every_command_refuses(folded, tmp_path, capsys, expected)


def _drop(manifest: dict, dotted: str) -> None:
    *parents, key = dotted.split(".")
    for part in parents:
        manifest = manifest[int(part)] if isinstance(manifest, list) else manifest[part]
    del manifest[key]


@pytest.mark.parametrize(
    "key",
    [
        "generation",
        "state_file",
        "base",
        "base.fingerprint",
        "globals",
        "globals.count",
        "arrivals",
        "arrivals.1.hash",
        "arrivals.0.folded_at",
        "strategy",
        "run",
        "checksum",
        "checksum.content",
    ],
)
def test_a_manifest_missing_a_key_is_one_line_naming_it(folded, tmp_path, key, capsys):
    base, paths, state = folded
    manifest = json.loads((state / "manifest.json").read_text())
    _drop(manifest, key)
    (state / "manifest.json").write_text(json.dumps(manifest))
    expected = f"{state / 'manifest.json'}: corrupt manifest: "
    assert_every_command_refuses(folded, tmp_path, capsys, expected, key.split(".")[-1])


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"generation": "3"}, "generation is a JSON string, expected an integer"),
        ({"generation": True}, "generation is a JSON boolean, expected an integer"),
        ({"arrivals": {"0": {}}}, "arrivals is a JSON object, expected a list"),
        ({"arrivals": [1, 2, 3]}, "arrivals[0] is a JSON number, not an object"),
        ({"globals": {"count": 7}}, "globals.count is 7 but 3 arrivals are recorded"),
        ({"format": "contmerge-state/99"}, "unknown state format 'contmerge-state/99'"),
    ],
)
def test_a_manifest_with_wrong_values_is_refused_naming_them(folded, tmp_path, changes, reason):
    base, _, state = folded
    edit_manifest(state, **changes)
    with pytest.raises(StateError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        Merger(base, state_dir=state, read_only=True)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        value = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([value[0] ^ 0x01]))


def test_a_flipped_byte_in_the_state_data_is_caught_by_verify_and_emit(folded, tmp_path, capsys):
    base, _, state = folded
    state_file = state / "state-00000003.safetensors"
    flip_byte(state_file, state_file.stat().st_size - 5)  # a byte of the last tensor's data
    before = snapshot(tmp_path)
    assert main(["verify", "--state", str(state)]) == 1
    err = capsys.readouterr().err
    assert f"{state_file}: the tensor data does not match the manifest's checksum" in err
    out = tmp_path / "out.safetensors"
    assert main(["emit", "--state", str(state), "--out", str(out)]) == 1
    assert "does not match the manifest's checksum" in capsys.readouterr().err
    assert snapshot(tmp_path) == before  # no output, nothing changed
    # the cheap check on open reads no data: folding on top of it is not refused (README)
    with Merger(base, state_dir=state, read_only=True) as merger:
        assert merger.count == 3


def test_a_flipped_byte_in_the_state_header_is_caught_on_open(folded, capsys):
    base, _, state = folded
    state_file = state / "state-00000003.safetensors"
    raw = state_file.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    padding = raw.rindex(b"}", 0, header_end) + 1  # the header's padding: still valid JSON
    assert padding < header_end, "no padding byte to alter"
    state_file.write_bytes(raw[:padding] + b"\t" + raw[padding + 1 :])
    with pytest.raises(StateError, match="its header does not match the manifest's checksum"):
        Merger(base, state_dir=state)
    assert main(["verify", "--state", str(state)]) == 1
    assert "header does not match" in capsys.readouterr().err


def test_a_state_file_swapped_in_from_another_run_is_caught_on_open(tmp_path, capsys):
    base, paths = write_models(tmp_path, 2)
    states = [tmp_path / "a", tmp_path / "b"]
    for state, first in zip(states, paths):  # same base, strategy and layout; other folds
        with Merger(base, "magmax", state) as merger:
            merger.fold(first)
    name = "state-00000001.safetensors"
    shutil.copy(states[1] / name, states[0] / name)
    before = snapshot(states[0])
    with pytest.raises(StateError, match="belongs to another merge state"):
        Merger(base, state_dir=states[0])
    assert main(["verify", "--state", str(states[0])]) == 1
    assert f"{states[0] / name}: belongs to another merge state" in capsys.readouterr().err
    assert main(["emit", "--state", str(states[0]), "--out", str(tmp_path / "o")]) == 1
    assert snapshot(states[0]) == before and not (tmp_path / "o").exists()


def test_an_older_generation_put_back_is_caught_on_open(folded):
    base, _, state = folded
    old = json.loads((state / "manifest.json").read_text())
    with Merger(base, state_dir=state) as merger:
        merger.fold(write_models(state.parent, 4)[1][3])
    # put generation 3's manifest back beside generation 4's file, renamed to match
    os.rename(state / "state-00000004.safetensors", state / "state-00000003.safetensors")
    (state / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(StateError, match="holds generation 4, the manifest is at generation 3"):
        Merger(base, state_dir=state)


@pytest.mark.parametrize("change", [-8, 8], ids=["truncated", "grown"])
def test_a_state_file_of_another_size_is_caught_on_open(folded, change):
    base, _, state = folded
    path = state / "state-00000003.safetensors"
    os.truncate(path, path.stat().st_size + change)
    # the reader's own layout check may see it first; either way the state file is named
    with pytest.raises(
        StateError,
        match=r"state-00000003\.safetensors.*(truncated|belong to no "
        r"tensor)|bytes, the manifest records",
    ):
        Merger(base, state_dir=state)


def test_verify_checks_the_base_and_says_what_it_checked(folded, tmp_path, capsys):
    base, paths, state = folded
    assert main(["verify", "--state", str(state)]) == 0
    out = capsys.readouterr().out
    assert "match the checksum of generation 3" in out and "is the base this state" in out
    assert main(["verify", "--state", str(state), "--base", str(paths[0])]) == 1
    assert "is not the base this state was started from" in capsys.readouterr().err
    base.rename(tmp_path / "moved.safetensors")
    assert main(["verify", "--state", str(state)]) == 0
    assert "base: not checked" in capsys.readouterr().out


def test_a_state_of_format_2_loads_verifies_and_is_upgraded_by_its_next_fold(tmp_path, capsys):
    data = tmp_path / "v2"
    shutil.copytree(DATA / "state-v2", data)
    base, ft = data / "base.safetensors", [data / f"ft{i}.safetensors" for i in range(3)]
    state = data / "state"
    before = snapshot(data)
    assert main(["verify", "--state", str(state), "--base", str(base)]) == 0
    assert "no checksum is recorded" in capsys.readouterr().out
    out = tmp_path / "old.safetensors"
    assert main(["emit", "--state", str(state), "--base", str(base), "--out", str(out)]) == 0
    assert snapshot(data) == before
    # the fixture was folded by the exact-SVD OPCM; today's Gram basis rounds differently
    assert_float32_close(load_file(out), merged_after(base, ft[:2], "opcm"))
    with Merger(base, state_dir=state) as merger:
        assert merger.count == 2
        merger.fold(ft[2])
    manifest = json.loads((state / "manifest.json").read_text())
    assert manifest["format"] == "contmerge-state/3" and manifest["checksum"]["bytes"] > 0
    assert main(["verify", "--state", str(state), "--base", str(base)]) == 0
    assert "match the checksum of generation 3" in capsys.readouterr().out
    with Merger(base, state_dir=state, read_only=True) as merger:
        assert_float32_close(merger.emit_state_dict(), merged_after(base, ft, "opcm"))


# --- read-only state directories ---------------------------------------------------------


@contextlib.contextmanager
def read_only_view(source: Path, where: Path) -> Iterator[Path]:
    """``source`` seen through a read-only bind mount (as root, who writes through permissions)
    or as a copy with write permission removed."""
    if os.geteuid() != 0:
        shutil.copytree(source, where)
        for path in [where, *where.rglob("*")]:
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        yield where
        return
    where.mkdir()
    bind = subprocess.run(["mount", "--bind", str(source), str(where)], capture_output=True)
    if bind.returncode:
        pytest.skip(f"cannot bind-mount here: {bind.stderr.decode().strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,ro,bind", str(where)], capture_output=True)
        if ro.returncode:
            pytest.skip(f"cannot remount read-only here: {ro.stderr.decode().strip()}")
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.parametrize("with_lock_file", [True, False])
def test_a_read_only_state_can_be_emitted_inspected_and_verified(
    folded, tmp_path, with_lock_file, capsys
):
    base, paths, state = folded
    if not with_lock_file:  # an archive copied without its dot files
        (state / ".lock").unlink()
        (state / ".state-spare.tmp").unlink()
    with read_only_view(state, tmp_path / "archived") as view:
        with pytest.raises(OSError):  # it really is read-only
            (view / "probe").write_bytes(b"")
        out = tmp_path / "merged.safetensors"
        assert main(["emit", "--state", str(view), "--out", str(out)]) == 0
        assert_same(load_file(out), merged_after(base, paths, "average"))
        assert main(["inspect", "--state", str(view)]) == 0
        assert main(["verify", "--state", str(view)]) == 0
        capsys.readouterr()
        assert main(["merge", "--base", str(base), "--state", str(view), str(paths[0])]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {view / '.lock'}: cannot") and "emit, inspect" in err


def test_a_lock_that_is_a_directory_is_a_clean_error(folded, tmp_path, capsys):
    base, paths, state = folded
    (state / ".lock").unlink()
    (state / ".lock").mkdir()
    before = snapshot(state)
    out = tmp_path / "out.safetensors"
    for command in commands(base, state, out, paths[0]):
        if command[0] == "inspect":
            continue  # reads only the manifest (replaced atomically): takes no lock
        assert main(command) == 1, command
        err = capsys.readouterr().err
        assert f"{state / '.lock'} is not a regular file" in err and err.count("\n") == 1
    assert snapshot(state) == before and not out.exists()
