"""The contmerge command line, run for real on safetensors files."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from contmerge import Merger
from contmerge.cli import build_parser, main

from helpers import fine_tuned, random_base


@pytest.fixture()
def files(tmp_path):
    base = random_base()
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for seed in range(3):
        paths.append(tmp_path / f"ft{seed}.safetensors")
        save_file(fine_tuned(base, seed), paths[-1])
    return tmp_path / "base.safetensors", paths


def test_merge_resume_emit_inspect(files, tmp_path, capsys):
    base, paths = files
    state = str(tmp_path / "state")
    common = ["merge", "--base", str(base), "--state", state, "--quiet"]
    assert main([*common, "--strategy", "opcm", "--set", "alpha=0.3", *map(str, paths[:2])]) == 0
    assert main([*common, str(paths[1]), str(paths[2])]) == 0  # resumes; ft1 is skipped
    out = capsys.readouterr().out
    assert "already folded as #2" in out and "folded as #3" in out
    assert main(["emit", "--state", state, "--out", str(tmp_path / "merged.safetensors")]) == 0
    direct = Merger(base, "opcm(alpha=0.3)")
    for path in paths:
        direct.fold(path)
    emitted = load_file(tmp_path / "merged.safetensors")
    for name, value in direct.emit_state_dict().items():
        assert torch.equal(emitted[name], value), name
    capsys.readouterr()
    assert main(["inspect", "--state", state]) == 0
    listing = capsys.readouterr().out
    assert "opcm(alpha=0.3)" in listing
    assert all(str(p) in listing for p in paths) and "#3" in listing


def test_bad_checkpoint_is_reported_and_the_rest_folds_with_keep_going(files, tmp_path, capsys):
    base, paths = files
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(paths[0].read_bytes()[:-100])
    state = str(tmp_path / "state")
    args = ["merge", "--base", str(base), "--strategy", "average", "--state", state, "--quiet"]
    assert main([*args, str(bad), str(paths[0])]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "truncated" in err
    assert main([*args, "--keep-going", str(bad), str(paths[0]), str(paths[1])]) == 1
    assert Merger(base, state_dir=state).count == 2


def test_unknown_strategy_names_the_available_ones(files, tmp_path, capsys):
    base, paths = files
    code = main(
        [
            "merge",
            "--base",
            str(base),
            "--strategy",
            "nope",
            "--state",
            str(tmp_path / "s"),
            str(paths[0]),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "unknown strategy 'nope'" in err and "opcm" in err


def test_every_command_has_help():
    from contmerge.simulations.cli import SCENARIOS

    parser = build_parser()
    commands = list(parser._subparsers._group_actions[0].choices)  # noqa: SLF001
    assert {"merge", "emit", "inspect", "strategies", "serve", "simulate", "demo"} <= set(commands)
    invocations = [[c] for c in commands] + [["simulate", s] for s in SCENARIOS]
    for words in invocations:
        result = subprocess.run(
            [sys.executable, "-m", "contmerge", *words, "--help"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, (words, result.stderr)
        assert "usage:" in result.stdout and "unavailable" not in result.stdout, words


def test_core_commands_do_not_import_flower():
    code = (
        "import sys; from contmerge.cli import build_parser; build_parser(['merge']); "
        "print('flwr' in sys.modules, 'ray' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.split() == ["False", "False"], result.stderr
