"""The adversarial suite: every input of the corpus (tests/corpus.py) is refused by the CLI.

Each case runs ``contmerge merge`` on a copy of a state directory that already holds two folded
arrivals, and asserts: exit status 1, no traceback, a message naming the file, the tensor
(where there is one) and the reason, no code run by a pickle, and every file of the state
directory byte-identical afterwards, but for the spare (``.state-spare.tmp``: a past generation
kept as scratch for the next fold to overwrite; a fold refused half-way rewrites it, and no open
removes it). Cases run in this process through
``contmerge.cli.main`` for speed, under three strategies that fold by different code paths
(average: elementwise chunks; ties: whole tensors; opcm: passes and projections); a handful run
again through a real ``python -m contmerge`` subprocess.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from corpus import CASES, RunsShell, World, base_tensors, fine_tune, save

from contmerge import Merger
from contmerge.cli import main
from contmerge.state import SPARE

STRATEGIES = ["average", "ties", "opcm"]
IN_A_SUBPROCESS = [
    "a text file (passwd)",
    "torch zip pickle running os.system",
    "shard ../outside",
    "LoRA product [1, 8] for [8, 8]",
    "header over the 16 MiB bound",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("corpus")
    base = base_tensors()
    return World(root, base, save(root / "base.safetensors", base), root / "PWNED")


@pytest.fixture(scope="module")
def states(world: World) -> dict[str, Path]:
    """Per strategy, a state directory holding two folded arrivals (copied for each case)."""
    out = {}
    for strategy in STRATEGIES:
        directory = world.root / f"state-{strategy}"
        with Merger(world.base_path, strategy, directory) as merger:
            for seed in (1, 2):
                merger.fold(save(world.root / f"ft{seed}.safetensors", fine_tune(world.base, seed)))
        out[strategy] = directory
    return out


def digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` but the spare (see above)."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != SPARE
    }


def check_refusal(case_id: str, directory: Path, argument: Path, code: int, err: str) -> None:
    case = CASES[case_id]
    assert code == 1, f"exit status {code}: {err}"
    assert "Traceback" not in err, err
    # "rejected FILE: reason", or "rejected FILE, tensor 'x': reason" when FILE is at fault
    line = next(
        (
            ln
            for ln in err.splitlines()
            if re.match(rf"rejected {re.escape(str(argument))}[:,]", ln)
        ),
        None,
    )
    assert line is not None, err
    named = directory / case.names if case.names else argument
    assert str(named) in line, line
    if case.tensor is not None:
        assert f"tensor {case.tensor!r}" in line, line
    assert re.search(case.reason, line), line


def prepare(case_id: str, world: World, state: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    work = tmp_path / "case"
    work.mkdir()
    argument = CASES[case_id].make(work, world)
    copy = tmp_path / "state"
    shutil.copytree(state, copy, symlinks=True)
    return work, argument, copy


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input_is_refused_cleanly_and_the_state_is_untouched(
    case_id: str,
    strategy: str,
    world: World,
    states: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    work, argument, state = prepare(case_id, world, states[strategy], tmp_path)
    before = digest(state)
    code = main(
        ["merge", "--base", str(world.base_path), "--state", str(state), "--quiet"]
        + [str(argument)]
    )
    check_refusal(case_id, work, argument, code, capsys.readouterr().err)
    assert not world.marker.exists(), "a pickle in the input ran code"
    assert digest(state) == before, "the state directory changed"


def contmerge(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "contmerge", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow  # a fresh interpreter imports torch and compiles the fold loops: ~20 s each
def test_bad_inputs_are_refused_by_a_real_process(
    world: World, states: dict[str, Path], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    shutil.copytree(states["average"], state, symlinks=True)
    before = digest(state)
    made = []
    for i, case_id in enumerate(IN_A_SUBPROCESS):
        work = tmp_path / f"case-{i}"
        work.mkdir()
        made.append((case_id, work, CASES[case_id].make(work, world)))
    common = ["merge", "--base", str(world.base_path), "--state", str(state), "--quiet"]
    run = contmerge(*common, "--keep-going", *(str(argument) for _, _, argument in made))
    for case_id, work, argument in made:
        check_refusal(case_id, work, argument, run.returncode, run.stderr)
    assert not world.marker.exists(), "a pickle in the input ran code"
    assert digest(state) == before
    # and the next good checkpoint folds as the third
    run = contmerge(*common, str(save(tmp_path / "good.safetensors", fine_tune(world.base, 3))))
    assert run.returncode == 0 and "folded as #3" in run.stdout, run.stderr


def test_every_bad_input_in_one_run_with_keep_going(
    world: World, states: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The whole corpus in one command line, then a good checkpoint: all refused, it folds."""
    state = tmp_path / "state"
    shutil.copytree(states["average"], state, symlinks=True)
    arguments = []
    for i, case_id in enumerate(CASES):
        work = tmp_path / f"case-{i}"
        work.mkdir()
        arguments.append(str(CASES[case_id].make(work, world)))
    good = save(tmp_path / "good.safetensors", fine_tune(world.base, 3))
    common = ["merge", "--base", str(world.base_path), "--state", str(state), "--quiet"]
    assert main([*common, "--keep-going", *arguments, str(good)]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert sum(line.startswith("rejected ") for line in err.splitlines()) == len(CASES)
    assert f"folded as #3: {good}" in out
    assert not world.marker.exists()


def test_the_pickle_payload_is_live(tmp_path: Path) -> None:
    """What the corpus's pickles would do if loaded unsafely: the marker check means something."""
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps({"trap": RunsShell(marker)}))
    assert marker.exists()


def test_the_corpus_holds_at_least_70_inputs() -> None:
    assert len(CASES) >= 70
