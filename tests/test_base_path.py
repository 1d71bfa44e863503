"""The base a state records: its absolute path and fingerprint, so a state is emitted from any
directory; a moved base is named, with the way to point to it; an older state's relative path
is read from the current directory, saying so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from contmerge.cli import main

from helpers import assert_float32_close, assert_same, fine_tuned, merged_after, random_base

DATA = Path(__file__).parent / "data"


@pytest.fixture()
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state made as a user would: in the models' directory, with relative paths."""
    work = tmp_path / "work"
    work.mkdir()
    base = random_base()
    save_file(base, work / "base.safetensors")
    save_file(fine_tuned(base, 0), work / "ft0.safetensors")
    monkeypatch.chdir(work)
    args = ["merge", "--quiet", "--base", "base.safetensors", "--state", "run", "--strategy"]
    assert main([*args, "average", "ft0.safetensors"]) == 0
    return work


def test_the_manifest_records_the_base_absolute_and_emit_works_from_elsewhere(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = json.loads((run / "run" / "manifest.json").read_text())
    assert manifest["base"]["source"] == str(run / "base.safetensors")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["emit", "--state", str(run / "run"), "--out", "merged.safetensors"]) == 0
    assert (
        "merged model of 1 checkpoint(s) written to merged.safetensors" in capsys.readouterr().out
    )
    want = merged_after(run / "base.safetensors", [run / "ft0.safetensors"], "average")
    assert_same(load_file(elsewhere / "merged.safetensors"), want)


def test_a_moved_base_is_named_with_how_to_point_to_it_and_its_fingerprint_checked(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run / "base.safetensors").rename(run / "moved.safetensors")
    capsys.readouterr()
    assert main(["emit", "--state", str(run / "run"), "--out", "m.safetensors"]) == 1
    err = capsys.readouterr().err
    assert (
        f"error: {run / 'run'}: the base this state was started from is not at its recorded path "
        f"{run / 'base.safetensors'} (moved or deleted?); point --base to it" in err
    )
    assert not (run / "m.safetensors").exists()
    args = ["emit", "--state", str(run / "run"), "--out", "m.safetensors", "--base"]
    assert main([*args, "moved.safetensors"]) == 0
    # another model given as the base: refused by its fingerprint, saying what to do
    save_file(random_base(seed=5), run / "other.safetensors")
    capsys.readouterr()
    assert main([*args, "other.safetensors"]) == 1
    err = capsys.readouterr().err
    assert "is not the base this state was started from" in err and "its fingerprint is" in err
    assert "give --base the base it was started from" in err
    # verify says the same about a missing base, and still checks the state itself
    assert main(["verify", "--state", str(run / "run")]) == 0
    out = capsys.readouterr().out
    assert (
        "base: not checked (the base this state was started from is not at its recorded path "
        f"{run / 'base.safetensors'}" in out
    )


def test_an_older_state_with_a_relative_base_reads_it_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "v2"
    shutil.copytree(DATA / "state-v2", data)
    assert json.loads((data / "state" / "manifest.json").read_text())["base"]["source"] == (
        "base.safetensors"
    )
    monkeypatch.chdir(data)
    assert main(["emit", "--state", "state", "--out", str(tmp_path / "old.safetensors")]) == 0
    err = capsys.readouterr().err
    assert (
        "note: state records its base as the relative path 'base.safetensors' (a state made by "
        f"an older contmerge): reading it from the current directory, {data / 'base.safetensors'}"
        in err
    )
    ft = [data / f"ft{i}.safetensors" for i in range(2)]
    # the fixture was folded by the exact-SVD OPCM; today's Gram basis rounds differently
    assert_float32_close(
        load_file(tmp_path / "old.safetensors"), merged_after(data / "base.safetensors", ft, "opcm")
    )
    # from another directory the relative path finds nothing: said so, with --base
    monkeypatch.chdir(tmp_path)
    assert main(["emit", "--state", str(data / "state"), "--out", "x.safetensors"]) == 1
    err = capsys.readouterr().err
    assert f"not at its recorded path {tmp_path / 'base.safetensors'}" in err and "--base" in err
