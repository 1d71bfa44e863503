"""The dtype policy (``contmerge.dtypes``): float arrivals in any dtype the compute dtype holds
fold as their values; conversions that would lose information are refused, saying why; the
merged model is written in the base's dtype unless ``--out-dtype`` says otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from contmerge import CheckpointError, Merger
from contmerge.cli import main

from helpers import fine_tuned, random_base

Model = dict[str, torch.Tensor]
STRATEGIES = ["average", "task_arithmetic", "magmax", "ties", "opcm", "chain(dare(p=0.5), ties())"]


def as_dtype(model: Model, dtype: torch.dtype) -> Model:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.items()}


def merged(base: Path | Model, arrivals: list[Path | Model], strategy: str) -> Model:
    with Merger(base, strategy) as merger:
        for arrival in arrivals:
            merger.fold(arrival)
        return merger.emit_state_dict()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16_and_fp16_arrivals_of_an_fp32_base_merge_as_their_float32_values(
    tmp_path: Path, strategy: str
) -> None:
    base = random_base()
    save_file(base, tmp_path / "base.safetensors")
    arrivals = [
        as_dtype(fine_tuned(base, 0), torch.bfloat16),
        as_dtype(fine_tuned(base, 1), torch.float16),
        fine_tuned(base, 2),
    ]
    paths = []
    for k, arrival in enumerate(arrivals):
        paths.append(tmp_path / f"ft{k}.safetensors")
        save_file(arrival, paths[-1])
    got = merged(tmp_path / "base.safetensors", paths, strategy)
    want = merged(base, [as_dtype(a, torch.float32) for a in arrivals], strategy)
    for name, value in want.items():
        assert got[name].dtype == base[name].dtype, name
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize("strategy", ["average", "ties", "opcm"])
def test_fp32_arrivals_of_a_bf16_base_merge_as_into_its_float32_copy(strategy: str) -> None:
    base = random_base(dtype=torch.bfloat16)
    arrivals = [
        as_dtype(fine_tuned(as_dtype(base, torch.float32), s), torch.float32) for s in (0, 1)
    ]
    got = merged(base, arrivals, strategy)
    want = merged(as_dtype(base, torch.float32), arrivals, strategy)
    for name, value in want.items():
        assert got[name].dtype == base[name].dtype, name
        assert torch.equal(got[name], value.to(base[name].dtype)), name


@pytest.mark.parametrize(
    "change, reason",
    [
        (
            lambda m: {**m, "norm.bias": m["norm.bias"].double()},
            "dtype F64, the base has F32: this base is merged in F32, which would round float64 "
            "values silently",
        ),
        (
            lambda m: {**m, "norm.bias": m["norm.bias"].to(torch.int32)},
            "dtype I32, the base has F32: an integer or boolean tensor cannot stand for float "
            "weights",
        ),
        (
            lambda m: {**m, "position_ids": m["position_ids"].float()},
            "dtype F32, the base has I64: integer and boolean tensors are not merged and must keep "
            "the base's dtype",
        ),
        (
            lambda m: {**m, "position_ids": m["position_ids"].to(torch.int32)},
            "dtype I32, the base has I64",
        ),
    ],
)
def test_a_conversion_that_would_lose_information_is_refused_and_the_state_kept(
    tmp_path: Path, change, reason: str
) -> None:
    base = random_base()
    with Merger(base, "average", state_dir=tmp_path / "state") as merger:
        merger.fold(fine_tuned(base, 0))
        before = merger.emit_state_dict()
        with pytest.raises(CheckpointError) as caught:
            merger.fold(change(fine_tuned(base, 1)))
        assert reason in str(caught.value)
        assert caught.value.tensor in ("norm.bias", "position_ids")
        assert merger.count == 1
        after = merger.emit_state_dict()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_a_float64_base_takes_arrivals_in_any_float_dtype() -> None:
    base = random_base(dtype=torch.float64)
    arrival = as_dtype(fine_tuned(base, 0), torch.float32)
    got = merged(base, [arrival], "average")
    want = merged(base, [as_dtype(arrival, torch.float64)], "average")
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_cli_folds_a_bf16_checkpoint_records_its_dtype_and_emits_in_the_dtype_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = random_base()
    save_file(base, tmp_path / "base.safetensors")
    save_file(as_dtype(fine_tuned(base, 0), torch.bfloat16), tmp_path / "ft_bf16.safetensors")
    save_file(fine_tuned(base, 1), tmp_path / "ft_fp32.safetensors")
    state = tmp_path / "run"
    args = ["merge", "--quiet", "--base", str(tmp_path / "base.safetensors"), "--state", str(state)]
    code = main(
        [*args, "--strategy", "average", "--out", str(tmp_path / "m.safetensors")]
        + [str(tmp_path / "ft_bf16.safetensors"), str(tmp_path / "ft_fp32.safetensors")]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"folded as #1: {tmp_path / 'ft_bf16.safetensors'}" in captured.out
    manifest = json.loads((state / "manifest.json").read_text())
    assert [a["dtype"] for a in manifest["arrivals"]] == ["BF16", "F32"]
    assert main(["inspect", "--state", str(state)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[-2].endswith(f"{tmp_path / 'ft_bf16.safetensors'}  BF16")
    default = load_file(tmp_path / "m.safetensors")
    assert default["norm.bias"].dtype == torch.float32
    assert default["position_ids"].dtype == torch.int64

    out = tmp_path / "m16.safetensors"
    assert main(["emit", "--state", str(state), "--out", str(out), "--out-dtype", "bf16"]) == 0
    with safe_open(out, "pt") as handle:
        for name in handle.keys():
            tensor = handle.get_tensor(name)
            if default[name].is_floating_point():
                assert tensor.dtype == torch.bfloat16, name
                assert torch.equal(tensor, default[name].to(torch.bfloat16)), name
            else:
                assert torch.equal(tensor, default[name]), name


def test_an_unknown_out_dtype_is_a_one_line_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["emit", "--state", str(tmp_path), "--out", "x", "--out-dtype", "int8"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "unknown out dtype 'int8': one of base, float32 (fp32), bfloat16 (bf16)" in err
