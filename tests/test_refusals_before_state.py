"""Issue 13 leftovers: arrivals recorded by absolute path; refusals that leave nothing behind."""

from __future__ import annotations

import json
import os

import pytest

from contmerge import Merger
from contmerge.cli import main
from contmerge.errors import ContmergeError

from helpers import write_models


@pytest.fixture()
def models(tmp_path, monkeypatch):
    base, paths = write_models(tmp_path, 2)
    monkeypatch.chdir(tmp_path)  # so that the paths below are relative, as a user types them
    return base, paths


def test_arrival_sources_are_recorded_absolute_and_shown_as_typed(models, tmp_path, capsys):
    assert main(["merge", "--base", "base.safetensors", "--state", "run", "--strategy",
                 "average", "--quiet", "ft0.safetensors", "ft1.safetensors"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "folded as #1: ft0.safetensors" in out and "#2: ft1.safetensors" in out  # as typed
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    sources = [a["source"] for a in manifest["arrivals"]]
    assert sources == [str(tmp_path / "ft0.safetensors"), str(tmp_path / "ft1.safetensors")]
    # one at a time (not the group commit) and in Python, the same; a name given is kept
    with Merger("base.safetensors", "opcm") as merger:
        result = merger.fold("ft0.safetensors")
        merger.fold("ft1.safetensors", name="client 7")
        assert result.source == "ft0.safetensors"
        recorded = [a.source for a in merger.arrivals]
        assert recorded == [str(tmp_path / "ft0.safetensors"), "client 7"]


@pytest.mark.parametrize(
    "options, reason",
    [
        (["--strategy", "magmax", "--weight", "2"], "takes no per-arrival weight"),
        (["--strategy", "average", "--weight", "-1"], "must be a finite number > 0"),
        (["--strategy", "opcm", "--set", "bogus=1"], "no setting 'bogus'"),
        (["--strategy", "bogus"], "unknown strategy 'bogus'"),
        (["--strategy", "average", "--linear", "enc(oder"], "--linear"),
        ([], "a strategy is needed to start a new merge state"),
    ],
)
def test_a_refused_new_state_leaves_nothing_behind(models, tmp_path, capsys, options, reason):
    code = main(["merge", "--base", "base.safetensors", "--state", "new", "--quiet", *options,
                 "ft0.safetensors"])  # fmt: skip
    assert code != 0
    assert reason in capsys.readouterr().err
    assert not os.path.lexists(tmp_path / "new"), sorted(os.listdir(tmp_path / "new"))


def test_the_python_api_refuses_before_making_the_directory(models, tmp_path):
    with pytest.raises(ContmergeError, match="no setting 'bogus'"):
        Merger("base.safetensors", "opcm", tmp_path / "new", settings={"bogus": 1})
    assert not os.path.lexists(tmp_path / "new")
