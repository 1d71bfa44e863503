"""Group commit: several waiting arrivals folded in one pass over the state, committed once.

The outcome is that of folding them one by one (bit for bit, every arrival recorded with its own
index, hash and file); anything that one-by-one folding would refuse or skip by content makes the
group fall back to it, with nothing changed first.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from contmerge import Merger
from contmerge.cli import main
from contmerge.manifest import Manifest

from helpers import assert_same, fine_tuned, random_base, write_models

GROUPED = ["average", "task_arithmetic", "magmax", "chain(dare(p=0.5), task_arithmetic())"]


def one_by_one(base, paths, strategy, state):
    with Merger(base, strategy, state_dir=state) as merger:
        results = [merger.fold(p) for p in paths]
        return results, merger.emit_state_dict(), merger.manifest


def comparable(manifest: Manifest) -> list[tuple]:
    return [(a.index, a.hash, a.file, a.source) for a in manifest.arrivals]


@pytest.mark.parametrize("strategy", GROUPED)
def test_a_group_folds_as_one_by_one_in_one_commit(tmp_path, strategy):
    base, ft = write_models(tmp_path, 4)
    _, expected, manifest = one_by_one(base, ft, strategy, tmp_path / "seq")
    with Merger(base, strategy, state_dir=tmp_path / "group") as merger:
        results = merger.fold_group(ft)
        assert results is not None
        assert [(r.status, r.index) for r in results] == [("folded", i) for i in (1, 2, 3, 4)]
        assert_same(merger.emit_state_dict(), expected)
        assert merger.manifest.generation == 1  # one commit for the four
        assert comparable(merger.manifest) == comparable(manifest)
        assert merger.manifest.globals == manifest.globals
    with Merger(base, state_dir=tmp_path / "group", read_only=True) as merger:
        assert_same(merger.emit_state_dict(), expected)  # as committed on disk


@pytest.mark.parametrize("strategy", ["ties", "opcm"])
def test_rules_with_passes_or_whole_model_values_are_not_grouped(tmp_path, strategy):
    base, ft = write_models(tmp_path, 3)
    with Merger(base, strategy, state_dir=tmp_path / "state") as merger:
        assert merger.fold_group(ft) is None
        assert merger.count == 0 and merger.manifest.generation == 0


def test_files_folded_before_are_skipped_and_the_rest_grouped(tmp_path):
    base, ft = write_models(tmp_path, 4)
    _, expected, _ = one_by_one(base, ft, "average", tmp_path / "seq")
    with Merger(base, "average", state_dir=tmp_path / "group") as merger:
        merger.fold(ft[1])
        results = merger.fold_group(ft)
        assert results is not None
        assert [(r.status, r.index) for r in results] == [
            ("folded", 2),
            ("duplicate", 1),
            ("folded", 3),
            ("folded", 4),
        ]
        assert merger.manifest.generation == 2
        # average is order-dependent only in rounding: compare with the same order
        _, same_order, _ = one_by_one(
            base, [ft[1], ft[0], ft[2], ft[3]], "average", tmp_path / "seq2"
        )
        assert_same(merger.emit_state_dict(), same_order)


def test_a_group_with_a_refused_or_repeated_arrival_changes_nothing(tmp_path):
    base, ft = write_models(tmp_path, 3)
    foreign = tmp_path / "foreign.safetensors"
    save_file(fine_tuned(random_base(seed=9), 0), foreign)  # fine-tuned from another base
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(ft[0], copy)  # same content, another file
    with Merger(base, "average", state_dir=tmp_path / "state") as merger:
        assert merger.fold_group([ft[0], foreign, ft[1]]) is None
        assert merger.fold_group([ft[0], ft[1], copy]) is None
        assert merger.count == 0 and merger.manifest.generation == 0


def test_merge_of_several_groups_them_and_keep_going_still_reports_each(tmp_path, capsys):
    base, ft = write_models(tmp_path, 3)
    foreign = tmp_path / "foreign.safetensors"
    save_file(fine_tuned(random_base(seed=9), 0), foreign)
    state = tmp_path / "state"
    common = ["merge", "--quiet", "--base", str(base), "--state", str(state)]
    assert main([*common, "--strategy", "average", *map(str, ft[:2])]) == 0
    out = capsys.readouterr().out
    assert f"folded as #1: {ft[0]}" in out and f"folded as #2: {ft[1]}" in out
    manifest = json.loads((state / "manifest.json").read_text())
    assert manifest["generation"] == 1 and len(manifest["arrivals"]) == 2
    assert main([*common, "--keep-going", str(ft[0]), str(foreign), str(ft[2])]) == 1
    captured = capsys.readouterr()
    assert f"already folded as #1: {ft[0]}" in captured.out
    assert f"rejected {foreign}" in captured.err and f"folded as #3: {ft[2]}" in captured.out
    _, expected, _ = one_by_one(base, ft, "average", tmp_path / "seq")
    with Merger(base, state_dir=state, read_only=True) as merger:
        assert_same(merger.emit_state_dict(), expected)


def test_an_overflowing_group_falls_back_and_the_fold_names_the_tensor(tmp_path):
    base = {"w.weight": torch.full((4, 4), 3.0e38), "b": torch.zeros(4)}
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for i in range(2):
        model = {k: v.clone() for k, v in base.items()}
        model["b"] += i + 1
        paths.append(tmp_path / f"ft{i}.safetensors")
        save_file(model, paths[-1])
    big = {"w.weight": torch.full((4, 4), -3.0e38), "b": torch.zeros(4)}
    save_file(big, tmp_path / "big.safetensors")
    with Merger(
        tmp_path / "base.safetensors",
        "task_arithmetic(scaling_factor=1.0)",
        state_dir=tmp_path / "state",
        max_relative_delta=None,
    ) as merger:
        assert merger.fold_group([*paths, tmp_path / "big.safetensors"]) is None
        assert merger.count == 0
