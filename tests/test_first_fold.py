"""Statistics-needing strategies name the file and the sidecar they looked for, and a first fold
that fails leaves a state that folded nothing, which any strategy may take over."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from contmerge import CheckpointError, Merger
from contmerge.cli import main

from helpers import fine_tuned, random_base


@pytest.fixture()
def files(tmp_path: Path) -> tuple[Path, Path]:
    base = random_base()
    save_file(base, tmp_path / "base.safetensors")
    save_file(fine_tuned(base, 0), tmp_path / "ft0.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "ft0.safetensors"


@pytest.mark.parametrize("strategy, kind", [("fisher", "fisher"), ("regmean", "gram")])
def test_missing_statistics_name_the_file_and_the_sidecar_looked_for(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], strategy, kind
) -> None:
    base, ft = files
    args = ["merge", "--quiet", "--base", str(base), "--state", str(tmp_path / "run")]
    assert main([*args, "--strategy", strategy, str(ft)]) == 1
    err = capsys.readouterr().err
    assert "<arrival>" not in err
    assert err.startswith(f"rejected {ft}: {strategy}(")
    assert (
        f"needs {kind!r} statistics with each arrival; none were given and looked for its "
        f"sidecar {tmp_path / f'ft0.{kind}.safetensors'} (none there)" in err
    )
    # in Python, an in-memory arrival has no sidecar: said so
    with Merger(base, strategy) as merger, pytest.raises(CheckpointError) as caught:
        merger.fold(fine_tuned(random_base(), 1), name="client-3")
    assert str(caught.value).startswith("client-3: ")
    assert "an in-memory arrival has no sidecar file" in str(caught.value)
    assert f"extras={{{kind!r}: ...}}" in str(caught.value)


@pytest.mark.parametrize("first", ["regmean", "average"])
def test_only_a_state_that_folded_nothing_is_taken_over_by_another_strategy(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], first: str
) -> None:
    base, ft = files
    state = tmp_path / "run"
    args = ["merge", "--quiet", "--base", str(base), "--state", str(state)]
    failed = main([*args, "--strategy", first, str(ft)]) == 1  # regmean: no statistics
    assert failed == (first == "regmean")
    capsys.readouterr()
    code = main([*args, "--strategy", "magmax", str(ft)])
    captured = capsys.readouterr()
    manifest = json.loads((state / "manifest.json").read_text())
    assert manifest["globals"]["count"] == 1
    if not failed:  # it folded something: it keeps its strategy
        assert code == 1
        assert "state was made with average(), not magmax(scaling_factor=0.5)" in captured.err
        return
    assert code == 0 and "folded as #1" in captured.out
    assert f"note: {state}: the state had folded nothing yet (regmean(" in captured.err
    assert "starting it anew with magmax(" in captured.err
    assert manifest["strategy"].startswith("magmax(")
    assert sorted(p.name for p in state.glob("state-*")) == ["state-00000001.safetensors"]
    with Merger(base, "magmax") as direct:
        direct.fold(ft)
        want = direct.emit_state_dict()
    with Merger(base, state_dir=state, read_only=True) as merger:
        for name, value in merger.emit_state_dict().items():
            assert torch.equal(value, want[name]), name
