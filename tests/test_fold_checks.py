"""What a fold refuses or flags although every input is finite and fits: a new state or an
emitted model that would overflow, and integer tensors that differ from the base."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from contmerge import CheckpointError, Merger
from contmerge.cli import main
from contmerge.errors import IgnoredTensorWarning
from contmerge.kernels import all_finite, fused_fold, keep_delta
from contmerge.strategies.task_arithmetic import TaskArithmetic
from contmerge.strategy import FoldContext

from helpers import fine_tuned, random_base

HUGE = 3e38  # finite in float32 (max 3.4e38); twice it is not


def overflow_models(tmp_path, first: float, second: float):
    """A base and two arrivals that move only ``layer.weight``, to ``first`` then ``second``."""
    base = {
        "layer.weight": torch.zeros(32, 16),
        "layer.bias": torch.zeros(32),
        "head.weight": torch.randn(4, 32, generator=torch.Generator().manual_seed(0)),
    }
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for k, value in enumerate((first, second)):
        model = {name: tensor.clone() for name, tensor in base.items()}
        model["layer.weight"][3, 5] = value
        model["layer.bias"] += 0.01 * (k + 1)
        paths.append(tmp_path / f"arrival{k}.safetensors")
        save_file(model, paths[-1])
    return tmp_path / "base.safetensors", paths


@pytest.mark.parametrize(
    "strategy, second",
    [
        ("average", -HUGE),  # fused loop: 3e38 + (−3e38 − 3e38)/2 → −inf
        ("task_arithmetic", HUGE),  # fused loop: 3e38 + 3e38 → +inf
        # two pre-processors are not fused: the chunk path of ``fold_into``
        ("chain(dare(p=0.0, seed=1), dare(p=0.0, seed=2), task_arithmetic())", HUGE),
        ("ties", HUGE),  # folded tensor by tensor
    ],
)
@pytest.mark.parametrize("durable", [True, False])
def test_a_fold_whose_new_state_overflows_is_refused_naming_the_tensor(
    tmp_path, strategy, second, durable
):
    base, (first, overflowing) = overflow_models(tmp_path, HUGE, second)
    state = tmp_path / "state" if durable else None
    with Merger(base, strategy, state, max_relative_delta=None) as merger:
        merger.fold(first)
        before = merger.emit_state_dict()
        with pytest.raises(CheckpointError) as refused:
            merger.fold(overflowing)
        assert refused.value.tensor == "layer.weight"
        assert "would make the merged state Inf or NaN" in str(refused.value)
        assert str(overflowing) in str(refused.value)
        assert merger.count == 1
        after = merger.emit_state_dict()
        assert all(bool(t.isfinite().all()) for t in after.values() if t.is_floating_point())
        for name, tensor in before.items():
            assert torch.equal(after[name], tensor), name
    if durable:
        with Merger(base, state_dir=state) as reopened:
            assert reopened.count == 1


def test_an_emit_that_overflows_the_base_dtype_writes_nothing(tmp_path, capsys):
    """float16 holds 60000 but not their sum: the state (float32) is finite, the model is not."""
    base = {"w": torch.zeros(8, 8, dtype=torch.float16), "b": torch.zeros(8, dtype=torch.float16)}
    save_file(base, tmp_path / "base.safetensors")
    for k in range(2):
        model = {"w": torch.full((8, 8), 60000.0 - 1000 * k).half(), "b": torch.zeros(8).half()}
        save_file(model, tmp_path / f"ft{k}.safetensors")
    state, out = tmp_path / "state", tmp_path / "merged.safetensors"
    common = ["--base", str(tmp_path / "base.safetensors"), "--state", str(state), "--quiet"]
    strategy = "task_arithmetic(scaling_factor=1.0)"
    ckpts = [str(tmp_path / f"ft{k}.safetensors") for k in range(2)]
    assert main(["merge", *common, "--any-base", "--strategy", strategy, *ckpts]) == 0
    capsys.readouterr()
    assert main(["emit", "--state", str(state), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "merged tensor 'w' is Inf or NaN in F16" in err and "nothing was written" in err
    assert not out.exists() and not list(tmp_path.glob(".merged*"))


def test_the_fused_loop_probes_the_new_state_for_overflow():
    """Finite δ, finite old state, a sum past the float range: the loop's sum says so."""
    entry = TaskArithmetic().entry_fold(None, FoldContext(index=1, globals={}))  # type: ignore[arg-type]
    loop = fused_fold(keep_delta, entry.update)
    n = 5000
    x, base, old = np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32)
    out = np.empty_like(x)
    assert math.isfinite(loop((), (), np.uint64(0), x, base, old, out))
    for where in (0, 17, n - 1):  # in the plainly stored head and in the streamed body
        x[:], old[:] = 0, 0
        x[where], old[where] = HUGE, HUGE
        assert not math.isfinite(loop((), (), np.uint64(0), x, base, old, out)), where
    assert all_finite(np.ones(3000, np.float32)) and all_finite(np.ones(0))
    for bad in (np.inf, -np.inf, np.nan):
        for where in (0, 1023, 1024, 2999):  # first and last of a block, the tail
            values = np.ones(3000)
            values[where] = bad
            assert not all_finite(values), (bad, where)


def test_an_integer_tensor_that_differs_from_the_base_is_warned_about(tmp_path, capsys):
    base = random_base()
    save_file(base, tmp_path / "base.safetensors")
    changed = fine_tuned(base, 0)
    changed["position_ids"] = base["position_ids"] * 5
    save_file(changed, tmp_path / "changed.safetensors")
    save_file(fine_tuned(base, 1), tmp_path / "same.safetensors")
    with Merger(tmp_path / "base.safetensors", "average") as merger:
        with pytest.warns(IgnoredTensorWarning, match="'position_ids' differs from the base"):
            result = merger.fold(tmp_path / "changed.safetensors")
        assert len(result.warnings) == 1 and "'position_ids'" in result.warnings[0]
        with warnings.catch_warnings():
            warnings.simplefilter("error", IgnoredTensorWarning)
            assert merger.fold(tmp_path / "same.safetensors").warnings == ()
        assert torch.equal(merger.emit_state_dict()["position_ids"], base["position_ids"])
    args = ["merge", "--base", str(tmp_path / "base.safetensors"), "--strategy", "average"]
    state = str(tmp_path / "state")
    assert main([*args, "--state", state, "--quiet", str(tmp_path / "changed.safetensors")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "tensor 'position_ids' differs from the base" in err
    out = tmp_path / "merged.safetensors"
    assert main(["emit", "--state", state, "--out", str(out)]) == 0
    assert torch.equal(load_file(out)["position_ids"], base["position_ids"])
