"""The contmerge command line, run for real on safetensors files."""

from __future__ import annotations

import contextlib
import functools
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from contmerge import Merger, StrategyError, parse_strategy
from contmerge.cli import build_parser, main
from contmerge.registry import available, elsewhere, parse_value

from helpers import fine_tuned, random_base

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


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
    assert err.count(str(bad)) == 1, err  # the file is named once, not "rejected X: X, …"
    assert main([*args, "--keep-going", str(bad), str(paths[0]), str(paths[1])]) == 1
    assert Merger(base, state_dir=state).count == 2


def test_another_base_refusal_says_how_to_allow_it(files, tmp_path, capsys):
    base, _ = files
    other = tmp_path / "other.safetensors"
    save_file(fine_tuned(random_base(seed=7), 0), other)
    args = ["merge", "--base", str(base), "--strategy", "average", "--state", str(tmp_path / "s")]
    assert main([*args, "--quiet", str(other)]) == 1
    err = capsys.readouterr().err
    assert "another base" in err and "--any-base" in err and "--max-relative-delta" in err
    assert err.count(str(other)) == 1, err
    assert main([*args, "--quiet", "--any-base", str(other)]) == 0


def test_a_missing_data_set_is_one_clean_note_with_the_full_install_command(
    tmp_path, monkeypatch, capsys
):
    from contmerge.simulations.data import DataConfig, resolve_use_fashion

    def scenario(_args) -> int:  # what a scenario does first: decide on its data
        use_fashion, notes = resolve_use_fashion(DataConfig(fashion_dir=str(tmp_path)))
        assert not use_fashion and len(notes) == 1
        return 0

    monkeypatch.setattr("contmerge.cli.cmd_strategies", scenario)
    assert main(["strategies"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: Fashion-MNIST not found"), err
    assert "`apt-get update && apt-get install -y dataset-fashion-mnist`" in err
    assert "Warning" not in err and "warnings.warn" not in err


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
    assert "contmerge simulate decentralized" in err and "contmerge simulate fw" in err


def _help_invocations() -> list[list[str]]:
    from contmerge.simulations.cli import SCENARIOS

    parser = build_parser()
    commands = list(parser._subparsers._group_actions[0].choices)  # noqa: SLF001
    expected = {"merge", "emit", "inspect", "verify", "strategies", "serve", "simulate", "demo"}
    assert expected <= set(commands)
    return [[c] for c in commands] + [["simulate", s] for s in SCENARIOS]


@functools.cache
def help_texts() -> dict[str, str]:
    """``contmerge … --help`` of every command, run in this process: one start-up (torch, Flower)
    for all of them instead of one per command."""
    texts = {}
    for words in _help_invocations():
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main([*words, "--help"])
            except SystemExit as done:
                assert done.code == 0, words
            else:
                raise AssertionError(f"{words} --help did not exit")
        texts["contmerge " + " ".join(words)] = out.getvalue()
    return texts


def test_every_command_has_help():
    for command, text in help_texts().items():
        assert "usage:" in text and "unavailable" not in text, command
    # and the real entry point, in a process of its own
    result = subprocess.run([sys.executable, "-m", "contmerge", "merge", "--help"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0 and "usage: contmerge merge" in result.stdout, result.stderr


SETTING = re.compile(r"\s+--set[ =]+['\"`]?(\w+)=([^\s'\"`]+)")


def strategy_specs(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Every strategy spec written in ``text``, with the ``--set`` settings that follow it: calls
    of a strategy name (``opcm(alpha=0.3)``, ``chain(…)``) and the value of each ``--strategy``
    (an unknown lower-case name is kept, so that a misspelt example fails)."""
    names = "|".join(sorted({*available(), "chain"}, key=len, reverse=True))
    found: list[tuple[str, dict[str, Any]]] = []
    end = 0
    for match in re.finditer(rf"(?<![\w.])({names})\(", text):
        if match.start() < end:
            continue  # inside a call already taken, e.g. dare(…) in chain(dare(…), magmax())
        end = _closing(text, match.end() - 1)
        found.append((text[match.start() : end], {}))
    for match in re.finditer(r"--strategy[ =]+(['\"]?)([a-z_]\w*(?:\(.*?\))?)\1", text):
        spec = match.group(2)
        settings = {}
        rest = text[match.end() :]
        while m := SETTING.match(rest):
            settings[m.group(1)] = parse_value(m.group(2))
            rest = rest[m.end() :]
        if "(" not in spec or settings:  # calls alone were found above
            found.append((spec, settings))
    return found


def _closing(text: str, opening: int) -> int:
    depth = 0
    for i in range(opening, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise AssertionError(f"unbalanced parenthesis in {text[opening - 20 : opening + 60]!r}")


def test_strategy_specs_finds_what_it_should():
    text = "`--strategy ties --set scaling_factor=0.1`, `--strategy 'chain(dare(p=0.9), magmax())'`"
    assert strategy_specs(text) == [
        ("chain(dare(p=0.9), magmax())", {}),
        ("ties", {"scaling_factor": 0.1}),
    ]
    assert strategy_specs("--strategy SPEC, weighted_average(x), --strategy opmc") == [("opmc", {})]


def test_every_strategy_example_in_help_and_docs_parses():
    texts = {**help_texts(), **{str(p.relative_to(ROOT)): p.read_text() for p in DOCS}}
    checked, failures = set(), []
    for where, text in texts.items():
        for spec, settings in strategy_specs(text):
            if elsewhere(spec):  # fw, dimat: not fold rules; their doors are tested on their own
                continue
            try:
                parse_strategy(spec, **settings)
            except StrategyError as exc:
                failures.append(f"{where}: {spec} {settings}: {exc}")
            checked.add(spec)
    assert not failures, "\n".join(failures)
    # the examples users copy are among those checked
    assert {"ties(scaling_factor=0.1)", "chain(dare(p=0.9, seed=1), magmax())",
            "opcm(alpha=0.3)", "magmax", "ties"} <= checked, checked  # fmt: skip


def _bash_block_after(heading: str) -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(heading) :]
    block = section[section.index("```bash\n") + 8 :]
    return [line for line in block[: block.index("```")].splitlines() if line.strip()]


def test_readme_merge_example_runs_as_written(tmp_path, monkeypatch, capsys):
    lines = _bash_block_after("## Merge checkpoints as they arrive")
    assert all(line.startswith("contmerge ") for line in lines), lines
    base = random_base()
    save_file(base, tmp_path / "base.safetensors")
    for seed, step in enumerate((1000, 2000, 3000)):
        save_file(fine_tuned(base, seed), tmp_path / f"ckpt-{step}.safetensors")
    monkeypatch.chdir(tmp_path)
    for line in lines:
        assert (
            main([*shlex.split(line)[1:], *(["--quiet"] if " merge " in f" {line}" else [])]) == 0
        )
    direct = Merger(tmp_path / "base.safetensors", "opcm")
    for step in (1000, 2000, 3000):
        direct.fold(tmp_path / f"ckpt-{step}.safetensors")
    emitted = load_file(tmp_path / "merged.safetensors")
    for name, value in direct.emit_state_dict().items():
        assert torch.equal(emitted[name], value), name
    assert "3 checkpoint(s)" in capsys.readouterr().out


def test_strategies_lists_settings_needs_and_folds_and_shows_one(capsys):
    assert main(["strategies"]) == 0
    listing = " ".join(capsys.readouterr().out.split())
    for name in [*available(), "chain", "dimat", "fw"]:
        assert f" {name} — " in listing, name
    assert "alpha: float = 0.5 (α) — share of Σσ" in listing
    assert "merge_func: str = 'sum'" in listing and "'fisher' statistics" in listing
    assert "contmerge simulate decentralized" in listing and "contmerge simulate fw" in listing
    assert main(["strategies", "ties"]) == 0
    one = " ".join(capsys.readouterr().out.split())
    assert one.startswith("ties: a one-pass merge rule")
    assert "threshold: float = 20.0 — percent of each row's entries kept" in one
    assert "spec: ties(scaling_factor=0.3, threshold=20.0, merge_func='sum')" in one
    assert main(["strategies", "tie"]) == 1
    assert "did you mean 'ties'?" in capsys.readouterr().err


def test_core_commands_do_not_import_flower():
    code = (
        "import sys; from contmerge.cli import build_parser; build_parser(['merge']); "
        "print('flwr' in sys.modules, 'ray' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.split() == ["False", "False"], result.stderr
