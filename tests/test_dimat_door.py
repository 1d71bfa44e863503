"""DIMAT through `contmerge merge/emit/inspect`: a per-agent merge step folding neighbours into
an anchor one at a time, durably, the same DimatFold the decentralized runs use."""

from __future__ import annotations

import json

import pytest
import torch
from fwdoor_models import bn_mlp, write_dimat_setup
from safetensors.torch import load_file, save_file

from contmerge.cli import main
from contmerge.datastate import MANIFEST
from contmerge.objectives import ObjectiveError, load_calibration
from contmerge.strategies.dimat import dimat_merge, weighted_average


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return write_dimat_setup(tmp_path_factory.mktemp("dimat"))


def dimat_args(setup: dict, state, *checkpoints) -> list[str]:
    return ["merge", "--strategy", "dimat", "--calibration", str(setup["calibration"]),
            "--state", str(state), "--quiet", *map(str, checkpoints)]  # fmt: skip


def accuracy(state: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    model = bn_mlp()
    model.load_state_dict(state)
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def test_merge_folds_neighbours_into_the_anchor_as_dimat_merge(tmp_path, setup, capsys):
    agents = setup["agents"]
    state = tmp_path / "state"
    assert main(dimat_args(setup, state, *agents)) == 0
    out = capsys.readouterr().out
    assert f"{agents[0]}: is the anchor" in out and f"{agents[2]}: folded as neighbour #2" in out
    emitted = tmp_path / "m.safetensors"
    assert main(["emit", "--state", str(state), "--out", str(emitted)]) == 0
    got = load_file(emitted)
    data = load_calibration(str(setup["calibration"]))
    want = dimat_merge(
        agents[0], 1 / 3, [(1 / 3, a) for a in agents[1:]], model_factory=data.model_factory,
        spec=data.permutation_spec(), calibration=data.batches,
    )  # fmt: skip
    assert sorted(got) == sorted(want)
    for name in want:  # weights summed unnormalised, divided at the end: rounding differs
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    x, y = setup["test"]
    dimat, wa = accuracy(got, x, y), accuracy(weighted_average([(1 / 3, a) for a in agents]), x, y)
    assert dimat > wa  # activation matching beats plain averaging of unaligned inits
    manifest = json.loads((state / MANIFEST).read_text())
    assert [n["weight"] for n in manifest["neighbours"]] == [1.0, 1.0]
    assert main(["inspect", "--state", str(state)]) == 0
    assert "strategy:  dimat" in capsys.readouterr().out


def test_one_neighbour_per_call_resumes_bit_for_bit_and_dedupes(tmp_path, setup, capsys):
    agents = setup["agents"]
    together, apart = tmp_path / "together", tmp_path / "apart"
    assert main(dimat_args(setup, together, *agents)) == 0
    for agent in agents:
        assert main(dimat_args(setup, apart, agent)) == 0
    assert main(dimat_args(setup, apart, agents[1])) == 0
    assert "already in the state as #1 (skipped)" in capsys.readouterr().out
    outs = []
    for state in (together, apart):
        outs.append(tmp_path / f"{state.name}.safetensors")
        assert main(["emit", "--state", str(state), "--out", str(outs[-1])]) == 0
    a, b = load_file(outs[0]), load_file(outs[1])
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_weights_and_errors(tmp_path, setup, capsys):
    agents = setup["agents"]
    state = tmp_path / "state"
    args = [*dimat_args(setup, state, *agents[:2]), "--weight", "3", "--weight", "1"]
    assert main(args) == 0
    manifest = json.loads((state / MANIFEST).read_text())
    assert manifest["settings"]["self_weight"] == 3.0 and manifest["total_weight"] == 4.0
    bad = tmp_path / "cal.safetensors"
    save_file({"y": torch.zeros(3)}, bad, metadata={"model": "fwdoor_models:bn_mlp"})
    with pytest.raises(ObjectiveError, match=f"{bad}: no tensor x"):
        load_calibration(str(bad))
    no_data = ["merge", "--strategy", "dimat", "--state", str(tmp_path / "s2"), str(agents[0])]
    assert main(no_data) == 1
    assert "needs --calibration" in capsys.readouterr().err


@pytest.mark.slow  # three interpreters importing torch
def test_sigkill_mid_fold_and_mid_commit_then_resume_gives_the_same_model(tmp_path, setup):
    from test_fw_door import kill_when_paused, run_child

    agents = setup["agents"]
    state, clean = tmp_path / "state", tmp_path / "clean"
    args = dimat_args(setup, state, *agents)
    # inside the fold of the second neighbour; then between its tensors and its manifest
    for point, at in [("fold", 1), ("commit", '"total_weight": 3.0')]:
        kill_when_paused(args, point, at)
        manifest = json.loads((state / MANIFEST).read_text())
        assert len(manifest["neighbours"]) == 1 and (state / manifest["tensors"]).exists()
    child = run_child(args)
    assert child.wait() == 0, child.stderr.read()
    assert main(dimat_args(setup, clean, *agents)) == 0
    outs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for directory, out in zip((state, clean), outs):
        assert main(["emit", "--state", str(directory), "--out", str(out)]) == 0
    a, b = load_file(outs[0]), load_file(outs[1])
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
