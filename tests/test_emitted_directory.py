"""What an emitted model directory carries: shards like the base's (or of ``--out-shard-size``)
with the index transformers reads, a model card, and per-arrival weights recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from contmerge import Merger, __version__, parse_strategy
from contmerge.cli import main
from contmerge.errors import SettingError

from helpers import fine_tuned, random_base

Model = dict[str, torch.Tensor]


def load_directory(out: Path) -> Model:
    index = out / "model.safetensors.index.json"
    if not index.exists():
        return load_file(out / "model.safetensors")
    tensors: Model = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        tensors.update(load_file(out / shard))
    return tensors


def assert_same(a: Model, b: Model) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture()
def sharded(tmp_path: Path) -> tuple[Path, list[Path], Model]:
    """A base in two shards (as ``save_pretrained`` writes them), two fine-tunes of it."""
    base = random_base()
    names = list(base)
    directory = tmp_path / "base"
    directory.mkdir()
    parts = {
        "model-00001-of-00002.safetensors": names[:5],
        "model-00002-of-00002.safetensors": names[5:],
    }
    for file, members in parts.items():
        save_file({n: base[n] for n in members}, directory / file)
    index = {"metadata": {}, "weight_map": {n: f for f, ms in parts.items() for n in ms}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    paths = []
    for seed in (0, 1):
        paths.append(tmp_path / f"ft{seed}.safetensors")
        save_file(fine_tuned(base, seed), paths[-1])
    return directory, paths, base


def test_the_emit_is_sharded_like_the_base_with_its_index(sharded, tmp_path: Path) -> None:
    directory, paths, base = sharded
    with Merger(directory, "ties") as merger:
        for path in paths:
            merger.fold(path)
        out = merger.emit(tmp_path / "merged")
        single = merger.emit(tmp_path / "single.safetensors")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert not (out / "model.safetensors").exists()
    merged = load_file(single)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in merged.values())
    assert_same(load_directory(out), merged)


def test_out_shard_size_bounds_each_shard_and_a_new_emit_replaces_the_old_files(
    sharded, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory, paths, _ = sharded
    state, out = tmp_path / "run", tmp_path / "merged"
    args = ["merge", "--quiet", "--base", str(directory), "--state", str(state)]
    args += ["--strategy", "average", "--out", str(out), "--out-shard-size", "1K"]
    assert main([*args, *map(str, paths)]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:
        tensors = load_file(out / shard)
        # a file holds at most 1 KiB, unless one tensor alone is larger
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 1024, shard
    with Merger(directory, state_dir=state, read_only=True) as merger:
        want = merger.emit_state_dict()
    assert_same(load_directory(out), want)
    # emitted again into the same directory as one file: the old shards and index go
    assert main(["emit", "--state", str(state), "--out", str(out), "--out-shard-size", "1G"]) == 0
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert_same(load_file(out / "model.safetensors"), want)


def test_a_shard_size_for_a_file_output_is_refused_before_anything_is_done(
    sharded, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory, paths, _ = sharded
    args = ["merge", "--quiet", "--base", str(directory), "--state", str(tmp_path / "run")]
    args += ["--strategy", "average", "--out", str(tmp_path / "m.safetensors")]
    assert main([*args, "--out-shard-size", "1M", str(paths[0])]) == 1
    err = capsys.readouterr().err
    assert "a shard size needs a directory to write the shards in" in err
    assert not (tmp_path / "run").exists()
    assert main([*args[:-2], "--out-dtype", "bf16", str(paths[0])]) == 1
    assert "--out-dtype and --out-shard-size say how to write --out: give --out" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()


def test_the_model_card_lists_strategy_settings_and_every_arrival(sharded, tmp_path: Path) -> None:
    directory, paths, _ = sharded
    state, out = tmp_path / "run", tmp_path / "merged"
    save_file(
        {
            k: v.to(torch.bfloat16) if v.is_floating_point() else v
            for k, v in load_file(paths[1]).items()
        },
        tmp_path / "ft1_bf16.safetensors",
    )
    args = ["merge", "--quiet", "--base", str(directory), "--state", str(state), "--out", str(out)]
    args += ["--strategy", "task_arithmetic", "--set", "scaling_factor=0.5"]
    args += [
        "--weight",
        "2",
        "--weight",
        "0.5",
        str(paths[0]),
        str(tmp_path / "ft1_bf16.safetensors"),
    ]
    assert main(args) == 0
    card = (out / "README.md").read_text()
    manifest = json.loads((state / "manifest.json").read_text())
    assert card.startswith("---\ntags:\n- contmerge\n- merge\n---\n")
    assert f"contmerge {__version__}" in card
    assert "`task_arithmetic(scaling_factor=0.5)`" in card
    assert f"- base: `{directory}` (fingerprint `{manifest['base']['fingerprint']}`)" in card
    rows = [
        line for line in card.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")
    ]
    assert rows == [
        f"| {a['index']} | `{a['source']}` | {d} | {w} | `{a['hash']}` | {a['folded_at']} |"
        for a, d, w in zip(manifest["arrivals"], ("F32", "BF16"), ("2.0", "0.5"))
    ]


@pytest.mark.parametrize("elementwise", [True, False])
def test_weights_of_average_and_task_arithmetic_and_their_record(elementwise: bool) -> None:
    base = random_base()
    models = [fine_tuned(base, s) for s in range(3)]
    weights = [2.0, 1.0, 0.25]

    def rule(spec: str):
        strategy = parse_strategy(spec)
        if elementwise:
            return strategy
        # the same rule through its per-tensor reference ``fold``
        return type(f"Whole{type(strategy).__name__}", (type(strategy),), {"elementwise": False})(
            **strategy.hparams()
        )

    with Merger(base, rule("average")) as average, Merger(base, rule("task_arithmetic")) as ta:
        for model, weight in zip(models, weights):
            average.fold(model, weight=weight)
            ta.fold(model, weight=weight)
        assert [a.weight for a in average.arrivals] == weights
        assert average.manifest.globals["weight_sum"] == sum(weights)
        got_average, got_ta = average.emit_state_dict(), ta.emit_state_dict()
    for name, value in base.items():
        if not value.is_floating_point():
            continue
        deltas = [m[name].double() - value.double() for m in models]
        mean = sum(w * d for w, d in zip(weights, deltas)) / sum(weights)
        torch.testing.assert_close(
            got_average[name].double(), value.double() + mean, rtol=0, atol=1e-5
        )
        total = sum(w * d for w, d in zip(weights, deltas))
        torch.testing.assert_close(
            got_ta[name].double(), value.double() + 0.3 * total, rtol=0, atol=1e-5
        )


def test_unit_weights_fold_exactly_as_no_weights() -> None:
    base = random_base()
    models = [fine_tuned(base, s) for s in range(3)]
    with Merger(base, "average") as weighted, Merger(base, "average") as plain:
        for model in models:
            weighted.fold(model, weight=1.0)
            plain.fold(model)
        assert_same(weighted.emit_state_dict(), plain.emit_state_dict())


def test_a_weight_is_refused_where_the_rule_takes_none_or_it_is_not_positive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = random_base()
    with Merger(base, "magmax") as merger, pytest.raises(SettingError) as caught:
        merger.fold(fine_tuned(base, 0), weight=2.0)
    assert (
        "magmax(scaling_factor=0.5) takes no per-arrival weight (average and task_arithmetic"
        in str(caught.value)
    )
    with Merger(base, "average") as merger:
        for bad in (0.0, -1.0, float("nan")):
            with pytest.raises(SettingError, match="must be a finite number > 0"):
                merger.fold(fine_tuned(base, 0), weight=bad)
        assert merger.count == 0
    save_file(base, tmp_path / "base.safetensors")
    save_file(fine_tuned(base, 0), tmp_path / "ft0.safetensors")
    args = [
        "merge",
        "--quiet",
        "--base",
        str(tmp_path / "base.safetensors"),
        "--state",
        str(tmp_path / "r"),
    ]
    assert (
        main(
            [
                *args,
                "--strategy",
                "average",
                "--weight",
                "1",
                "--weight",
                "2",
                str(tmp_path / "ft0.safetensors"),
            ]
        )
        == 1
    )
    assert (
        "2 --weight value(s) for 1 checkpoint(s): give one per checkpoint"
        in capsys.readouterr().err
    )


def test_readme_precision_example_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Precisions, moved bases, what `emit` writes") :]
    block = section[section.index("```bash\n") + 8 :]
    lines = [line for line in block[: block.index("```")].splitlines() if line.strip()]
    assert len(lines) == 3 and all(line.startswith("contmerge ") for line in lines)
    base = random_base()
    models = {"ft_bf16": torch.bfloat16, "ft_fp16": torch.float16}
    for directory, tensors in [("base", base)] + [
        (name, {k: v.to(d) if v.is_floating_point() else v for k, v in fine_tuned(base, s).items()})
        for s, (name, d) in enumerate(models.items())
    ]:
        (tmp_path / directory).mkdir()
        save_file(tensors, tmp_path / directory / "model.safetensors")
    monkeypatch.chdir(tmp_path)
    for line in lines:
        assert main([*shlex.split(line)[1:], *(["--quiet"] if " merge " in line else [])]) == 0
    arrivals = json.loads((tmp_path / "run" / "manifest.json").read_text())["arrivals"]
    assert [(a["dtype"], a["weight"]) for a in arrivals] == [("BF16", 2.0), ("F16", 1.0)]
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    for name, value in base.items():
        if value.is_floating_point():
            deltas = [
                load_file(tmp_path / n / "model.safetensors")[name].double() - value.double()
                for n in models
            ]
            want = value.double() + (2 * deltas[0] + deltas[1]) / 3
            torch.testing.assert_close(merged[name].double(), want, rtol=0, atol=1e-5)
    half = load_file(tmp_path / "merged_bf16" / "model.safetensors")
    assert half["norm.bias"].dtype == torch.bfloat16
    assert torch.equal(half["norm.bias"], merged["norm.bias"].to(torch.bfloat16))
    assert (tmp_path / "merged" / "README.md").is_file()


def test_out_options_without_out_are_refused_when_every_checkpoint_is_already_folded(
    sharded, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The no-op answer from the manifest must not pass over the mistake."""
    directory, paths, _ = sharded
    args = ["merge", "--quiet", "--base", str(directory), "--state", str(tmp_path / "run")]
    assert main([*args, "--strategy", "average", str(paths[0])]) == 0
    capsys.readouterr()
    assert main([*args, "--out-dtype", "bf16", str(paths[0])]) == 1
    assert "give --out" in capsys.readouterr().err
