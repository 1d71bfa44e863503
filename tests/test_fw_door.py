"""FW-Merging through `contmerge merge/emit/inspect`: the objective protocol, a durable pool
state, dedupe, and resume after SIGKILL at several points (real subprocesses)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import fwdoor_models
import pytest
import torch
from fwdoor_models import write_fw_setup
from safetensors.torch import load_file, save_file

from contmerge.cli import main
from contmerge.datastate import MANIFEST
from contmerge.objectives import ObjectiveError, load_objective
from contmerge.strategies.frank_wolfe import FrankWolfeMerger

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return write_fw_setup(tmp_path_factory.mktemp("fw"))


def fw_args(setup: dict, state: Path, *extra: str) -> list[str]:
    return [
        "merge", "--strategy", "fw", "--base", str(setup["base"]), "--objective",
        str(setup["objective"]), "--state", str(state), "--quiet", "--set", "iterations=5", *extra,
    ]  # fmt: skip


def reference(setup: dict, iterations: int = 5) -> dict[str, torch.Tensor]:
    objective = load_objective(str(setup["objective"]))
    with FrankWolfeMerger.from_preset("hard", setup["base"], setup["pool"], objective) as fw:
        fw.run(iterations)
        return fw.merged()


def assert_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


# --- the objective protocol -------------------------------------------------------------------
def test_objective_file_gives_the_classifier_objective(setup):
    objective = load_objective(str(setup["objective"]))
    assert objective.tasks == ["task0", "task1", "task2"]
    params = dict(load_file(setup["base"]))
    loss = objective.loss(params, "task0")
    assert loss.ndim == 0 and float(loss) > 0


def test_objective_errors_name_the_file_and_the_reason(tmp_path, setup):
    data = dict(load_file(setup["objective"]))
    no_labels = tmp_path / "nolabels.safetensors"
    save_file({"x.a": data["x.task0"]}, no_labels, metadata={"model": "fwdoor_models:mlp"})
    with pytest.raises(ObjectiveError, match=f"{no_labels}: tensor y.a is missing"):
        load_objective(str(no_labels))
    no_model = tmp_path / "nomodel.safetensors"
    save_file({"x.a": data["x.task0"], "y.a": data["y.task0"]}, no_model)
    with pytest.raises(ObjectiveError, match="no model: put 'model'"):
        load_objective(str(no_model))
    with pytest.raises(ObjectiveError, match="no such file"):
        load_objective(str(tmp_path / "absent.safetensors"))
    with pytest.raises(ObjectiveError, match="cannot import module 'no_such_module_xyz'"):
        load_objective("no_such_module_xyz:objective")
    with pytest.raises(ObjectiveError, match="not an Objective"):
        load_objective("fwdoor_models:mlp")  # returns a module, not an Objective


def test_objective_entry_point(setup, monkeypatch):
    fwdoor_models.OBJECTIVE_FILE = str(setup["objective"])
    objective = load_objective("fwdoor_models:objective")
    assert objective.tasks == ["task0", "task1", "task2"]


# --- the CLI door -----------------------------------------------------------------------------
def test_merge_emit_inspect_equal_the_in_memory_run_and_dedupe(tmp_path, setup, capsys):
    state = tmp_path / "state"
    pool = [str(p) for p in setup["pool"]]
    assert main(fw_args(setup, state, *pool)) == 0
    out = capsys.readouterr().out
    assert "joined the pool as #2" in out and "iteration 4: loss" in out
    emitted = tmp_path / "merged.safetensors"
    assert main(["emit", "--state", str(state), "--out", str(emitted)]) == 0
    assert_equal(load_file(emitted), reference(setup))
    # the same checkpoints again: nothing joins, nothing runs, θ unchanged
    assert main(fw_args(setup, state, pool[1])) == 0
    assert "already in the state as #1 (skipped)" in capsys.readouterr().out
    manifest = json.loads((state / MANIFEST).read_text())
    assert manifest["iteration"] == 5 and manifest["owed"] == 0 and len(manifest["pool"]) == 3
    assert [r["iteration"] for r in manifest["log"]] == [0, 1, 2, 3, 4]
    assert main(["inspect", "--state", str(state)]) == 0
    shown = capsys.readouterr().out
    assert "strategy:  fw" in shown and "iteration: 5 (0 owed)" in shown
    assert main(["verify", "--state", str(state)]) == 0
    assert "3 checkpoint file(s) unchanged" in capsys.readouterr().out
    # a state of one kind is not folded into as another
    ordinary = ["merge", "--base", str(setup["base"]), "--any-base", "--quiet", "--state"]
    assert main([*ordinary, str(state), "--strategy", "average", pool[0]]) == 1
    assert "a fw state, not one of average" in capsys.readouterr().err
    assert main([*ordinary, str(tmp_path / "avg"), "--strategy", "average", pool[0]]) == 0
    assert main(fw_args(setup, tmp_path / "avg", pool[0])) == 1
    assert "a state of a fold rule, not of fw" in capsys.readouterr().err
    assert sorted(p.name for p in state.iterdir() if p.suffix == ".safetensors") == [
        "initial.safetensors", f"tensors-{manifest['generation']:08d}.safetensors"
    ]  # fmt: skip


def test_a_late_arrival_joins_and_runs_more_iterations(tmp_path, setup):
    state = tmp_path / "state"
    pool = [str(p) for p in setup["pool"]]
    assert main(fw_args(setup, state, *pool[:2])) == 0
    # resuming needs neither the base, nor the objective, nor the settings again
    assert main(["merge", "--state", str(state), "--quiet", pool[2]]) == 0
    objective = load_objective(str(setup["objective"]))
    with FrankWolfeMerger.from_preset("hard", setup["base"], setup["pool"][:2], objective) as fw:
        fw.run(5)
        fw.add(setup["pool"][2], iterations=5)
        want = fw.merged()
    emitted = tmp_path / "m.safetensors"
    assert main(["emit", "--state", str(state), "--out", str(emitted)]) == 0
    assert_equal(load_file(emitted), want)


def test_bad_arrival_and_changed_pool_file_are_refused(tmp_path, setup, capsys):
    state = tmp_path / "state"
    wrong = tmp_path / "wrong.safetensors"
    tensors = dict(load_file(setup["pool"][0]))
    tensors["0.weight"] = tensors["0.weight"][:, :10].contiguous()
    save_file(tensors, wrong)
    assert main(fw_args(setup, state, str(wrong))) == 1
    assert f"{wrong}" in capsys.readouterr().err
    copy = tmp_path / "ft.safetensors"
    copy.write_bytes(Path(setup["pool"][0]).read_bytes())
    assert main(fw_args(setup, state, str(copy))) == 0
    tensors = dict(load_file(copy))
    tensors["0.bias"] = tensors["0.bias"] + 1
    save_file(tensors, copy)
    assert main(fw_args(setup, state, str(setup["pool"][1]))) == 1
    assert "changed since it joined this state" in capsys.readouterr().err


# --- durability: SIGKILL, restart, the same θ --------------------------------------------------
CHILD = """
import os, sys, time
import contmerge.datastate as ds
import contmerge.strategies.dimat as dimat
import contmerge.strategies.frank_wolfe as fw
point, at = os.environ["PAUSE_POINT"], os.environ["PAUSE_AT"]
def pause(where):
    print("PAUSED", where, flush=True)
    time.sleep(60)
if point == "iteration":  # inside the iteration: gradient taken, θ not yet stepped
    score = fw.FrankWolfeMerger._score
    def slow_score(self, *a, **k):
        if self.iteration == int(at):
            pause("in iteration")
        return score(self, *a, **k)
    fw.FrankWolfeMerger._score = slow_score
elif point == "fold":  # DIMAT: inside the fold of neighbour number `at` (from 0)
    add = dimat.DimatFold.add
    def slow_add(self, *a, **k):
        if self.folded == int(at):
            pause("in fold")
        return add(self, *a, **k)
    dimat.DimatFold.add = slow_add
elif point == "commit":  # the next tensors written, the manifest (holding `at`) not yet
    write = ds.atomic_write_bytes
    def slow_write(path, data):
        if at.encode() in data:
            pause("in commit")
        return write(path, data)
    ds.atomic_write_bytes = slow_write
from contmerge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_child(args: list[str], point: str = "none", at: object = -1) -> subprocess.Popen:
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PAUSE_POINT": point, "PAUSE_AT": str(at), "PYTHONPATH": path}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def kill_when_paused(args: list[str], point: str, at: object) -> None:
    """Run the CLI in a child that pauses at ``point``; SIGKILL it there."""
    child = run_child(args, point, at)
    lines = iter(child.stdout.readline, "")
    line = next((x for x in lines if x.startswith("PAUSED")), "")
    assert line.strip() == f"PAUSED in {point}", child.stderr.read()
    child.send_signal(signal.SIGKILL)
    child.wait()


@pytest.mark.slow  # four interpreters importing torch: ~50 s on the shared machine
def test_sigkill_mid_iteration_and_mid_commit_then_resume_gives_the_same_theta(tmp_path, setup):
    state = tmp_path / "state"
    args = fw_args(setup, state, *map(str, setup["pool"]))
    # where each run is killed: inside iteration 1; between the tensors and the manifest of
    # the commit after iteration 3 (its tensors file is left an orphan); inside iteration 4
    kills = [("iteration", 1, 1), ("commit", '"iteration": 4,', 3), ("iteration", 4, 4)]
    for point, at, committed in kills:
        kill_when_paused(args, point, at)
        manifest = json.loads((state / MANIFEST).read_text())
        assert manifest["iteration"] == committed  # the last commit before the kill
        assert (state / manifest["tensors"]).exists()
    child = run_child(args)
    assert child.wait() == 0, child.stderr.read()
    emitted = tmp_path / "m.safetensors"
    assert main(["emit", "--state", str(state), "--out", str(emitted)]) == 0
    # CPU float32, same order of operations: bit-equal to the run that was never interrupted
    assert_equal(load_file(emitted), reference(setup))
    manifest = json.loads((state / MANIFEST).read_text())
    assert [r["iteration"] for r in manifest["log"]] == [0, 1, 2, 3, 4]


def test_readme_fw_and_dimat_examples_run_as_written(tmp_path, monkeypatch, capsys):
    from fwdoor_models import write_dimat_setup
    from test_cli import _bash_block_after

    lines = _bash_block_after("## DIMAT and FW-Merging through the same doors")
    assert len(lines) == 5 and all(line.startswith("contmerge ") for line in lines), lines
    fw = write_fw_setup(tmp_path)
    write_dimat_setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    for line in lines:
        assert main(shlex.split(line)[1:]) == 0, line
    assert "strategy:  fw" in capsys.readouterr().out
    objective = load_objective(str(fw["objective"]))
    with FrankWolfeMerger.from_preset("hard", fw["base"], fw["pool"], objective) as merger:
        merger.run(5)
        assert_equal(load_file(tmp_path / "fw-merged.safetensors"), merger.merged())
    assert (tmp_path / "agent0-merged.safetensors").exists()


def test_a_refused_arrival_leaves_the_open_state_as_committed(tmp_path, setup):
    from contmerge.errors import CheckpointError
    from contmerge.fw_state import FwState

    wrong = tmp_path / "wrong.safetensors"
    tensors = dict(load_file(setup["pool"][0]))
    tensors["2.weight"] = tensors["2.weight"][:5].contiguous()
    save_file(tensors, wrong)
    good = setup["pool"][0]
    with FwState(
        tmp_path / "s", setup["base"], str(setup["objective"]), {"iterations": 1}
    ) as state:
        with pytest.raises(CheckpointError, match="shape"):
            state.fold([good, wrong])  # one command: the good one is not committed either
        assert state.manifest["pool"] == [] and state.merger.pool == []
        state.fold([good])
        assert len(state.manifest["pool"]) == 1 and len(state.merger.pool) == 1
