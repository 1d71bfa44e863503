"""A full disk (a real one: a small tmpfs) during state creation, a fold and an emit: a clear
error naming the file, exit status 1, the state still loadable and nothing partial left."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from contmerge import Merger
from contmerge.cli import main

from helpers import assert_same, merged_after, write_models

PAGE = 4096


@pytest.fixture()
def small_disk(tmp_path):
    """A 16 MiB tmpfs: a file system that really runs out of space."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the RLIMIT_FSIZE test runs anyway)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)]).returncode:  # a file still open: detach it
            subprocess.run(["umount", "--lazy", str(disk)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Take the disk's free space but ``leave`` bytes, with a file that ``unlink`` gives back."""
    stats = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        handle.write(b"\0" * (stats.f_bavail * stats.f_frsize - leave))
    return filler


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture()
def models(tmp_path):
    """A base whose state is about 1.3 MiB, and three fine-tunes (outside the small disk)."""
    return write_models(tmp_path, 3, scale=2)


def merge(base: Path, state: Path, *checkpoints: Path) -> list[str]:
    ckpts = [str(c) for c in checkpoints]
    return ["merge", "--base", str(base), "--state", str(state), "--quiet", *ckpts]


def test_disk_full_while_creating_the_state(small_disk, models, capsys):
    base, paths = models
    state = small_disk / "state"
    filler = fill(small_disk, leave=64 << 10)
    assert main([*merge(base, state, paths[0]), "--strategy", "average"]) == 1
    err = capsys.readouterr().err
    assert f"no space left on device while writing {state / 'state-00000000.safetensors'}" in err
    assert err.count("\n") == 1
    assert listing(state) == [".lock"]  # no manifest, no partial file
    filler.unlink()
    assert main([*merge(base, state, paths[0]), "--strategy", "average"]) == 0
    with Merger(base, state_dir=state) as merger:
        assert_same(merger.emit_state_dict(), merged_after(base, paths[:1], "average"))


def test_disk_full_during_a_fold_keeps_the_state(small_disk, models, capsys):
    base, paths = models
    state = small_disk / "state"
    assert main([*merge(base, state, paths[0]), "--strategy", "magmax"]) == 0
    # the first fold's commit turned the creation's file into the spare the next fold reuses:
    # remove it so the next fold needs new blocks
    (state / ".state-spare.tmp").unlink()
    filler = fill(small_disk, leave=64 << 10)
    capsys.readouterr()
    assert main(merge(base, state, paths[1])) == 1
    err = capsys.readouterr().err
    assert f"no space left on device while writing {state / 'state-00000002.safetensors'}" in err
    assert main(["verify", "--state", str(state)]) == 0
    with Merger(base, state_dir=state, read_only=True) as merger:
        assert merger.count == 1
        assert_same(merger.emit_state_dict(), merged_after(base, paths[:1], "magmax"))
    filler.unlink()
    assert main(merge(base, state, paths[1], paths[2])) == 0
    with Merger(base, state_dir=state) as merger:
        assert_same(merger.emit_state_dict(), merged_after(base, paths, "magmax"))


def test_disk_full_while_writing_the_manifest_keeps_the_state(small_disk, models, capsys):
    """The new generation's file fits, its manifest does not: the fold is not committed."""
    base, paths = models
    state = small_disk / "state"
    assert main([*merge(base, state, paths[0]), "--strategy", "average"]) == 0
    (state / ".state-spare.tmp").unlink()
    state_bytes = (state / "state-00000001.safetensors").stat().st_size
    filler = fill(small_disk, leave=-(-state_bytes // PAGE) * PAGE)
    capsys.readouterr()
    assert main(merge(base, state, paths[1])) == 1
    err = capsys.readouterr().err
    assert f"no space left on device while writing {state / 'manifest.json'}" in err, err
    assert "state-00000002.safetensors" not in listing(state)
    with Merger(base, state_dir=state, read_only=True) as merger:
        assert merger.count == 1
    filler.unlink()
    assert main(merge(base, state, paths[1])) == 0
    with Merger(base, state_dir=state) as merger:
        assert_same(merger.emit_state_dict(), merged_after(base, paths[:2], "average"))


@pytest.mark.parametrize("out_name", ["merged.safetensors", "merged-dir"])
def test_disk_full_during_an_emit_leaves_no_partial_output(
    small_disk, models, tmp_path, out_name, capsys
):
    base, paths = models
    state = tmp_path / "state"
    assert main([*merge(base, state, *paths), "--strategy", "task_arithmetic"]) == 0
    fill(small_disk, leave=64 << 10)
    out = small_disk / out_name
    capsys.readouterr()
    assert main(["emit", "--state", str(state), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    target = out if out.suffix else out / "model.safetensors"
    assert f"no space left on device while writing {target}" in err and err.count("\n") == 1
    assert listing(small_disk) == ["filler"]  # no output, no temp file, no empty directory


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed

    return apply


@pytest.mark.slow  # real processes started several times
def test_a_file_size_limit_is_reported_like_a_full_disk(models, tmp_path):
    """RLIMIT_FSIZE (EFBIG) needs no root: the same path as ENOSPC, on any machine."""
    base, paths = models
    state = tmp_path / "state"
    command = [sys.executable, "-m", "contmerge", *merge(base, state, paths[0])]
    limited = subprocess.run(
        [*command, "--strategy", "average"],
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size(256 << 10),
        timeout=600,
        cwd=tmp_path,
    )
    assert limited.returncode == 1, limited.stderr
    assert (
        f"file size limit exceeded while writing {state / 'state-00000000.safetensors'}"
        in limited.stderr
    )
    assert "Traceback" not in limited.stderr and listing(state) == [".lock"]
    done = subprocess.run(
        [*command, "--strategy", "average"], capture_output=True, timeout=600, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "merged.safetensors"
    emit = [sys.executable, "-m", "contmerge", "emit", "--state", str(state), "--out", str(out)]
    limited = subprocess.run(
        emit,
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size(256 << 10),
        timeout=600,
        cwd=tmp_path,
    )
    assert limited.returncode == 1 and f"while writing {out}" in limited.stderr, limited.stderr
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
    assert_same(
        Merger(base, state_dir=state, read_only=True).emit_state_dict(),
        merged_after(base, paths[:1], "average"),
    )
