"""One fast-path decision per tensor (``contmerge.fold_plan.plan``), and every path it can choose
held equal to the reference for every registered elementwise rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_fast_fold import ELEMENTWISE, _Shadow, big_base, bits, save, whole
from test_sources import GOOD_LORA, hand_adapter, lora_base

import contmerge.fold_run
from contmerge import Merger
from contmerge.fold_plan import FoldPath, plan
from contmerge.layout import tensor_infos
from contmerge.registry import parse_strategy
from contmerge.sources import StateDictCheckpoint, open_checkpoint
from contmerge.strategies.dare import Dare
from contmerge.strategies.magmax import MagMax
from contmerge.strategy import Chain, FoldContext

from helpers import fine_tuned


def _path_of(strategy, arrival, base, name: str) -> FoldPath:
    info = tensor_infos(StateDictCheckpoint(base), None)[name]
    return plan(strategy, arrival, info, FoldContext(index=1, globals={}))


@pytest.mark.parametrize(
    "strategy, path",
    [
        ("average", FoldPath.FUSED),
        ("task_arithmetic", FoldPath.FUSED),
        ("magmax", FoldPath.FUSED),
        ("chain(dare(), magmax())", FoldPath.FUSED),  # one pre-processor fuses into the loop
        (Chain(Dare(p=0.5, seed=1), Dare(p=0.3, seed=2), MagMax()), FoldPath.CHUNKED),
        (_Shadow(), FoldPath.CHUNKED),  # elementwise, no compiled loop: its fold_into
        ("opcm", FoldPath.REFERENCE),
        ("fisher", FoldPath.REFERENCE),  # statistics per arrival: whole tensors
        ("regmean", FoldPath.REFERENCE),
    ],
    ids=str,
)
def test_plan_picks_one_path_per_rule_for_a_full_checkpoint(strategy, path) -> None:
    base = big_base()
    arrival = StateDictCheckpoint(fine_tuned(base, 1))
    assert _path_of(parse_strategy(strategy), arrival, base, "layer.weight") is path


def test_an_adapter_folds_whole_even_for_an_elementwise_rule(tmp_path: Path) -> None:
    base = lora_base()
    adapter = open_checkpoint(
        hand_adapter(tmp_path / "a", GOOD_LORA), StateDictCheckpoint(base).meta
    )
    assert _path_of(parse_strategy("average"), adapter, base, "fc.weight") is FoldPath.REFERENCE
    # a tensor the adapter does not touch cannot be read in chunks either
    assert _path_of(parse_strategy("magmax"), adapter, base, "fc.bias") is FoldPath.REFERENCE


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_every_path_of_every_registered_elementwise_rule_equals_the_reference(
    tmp_path, monkeypatch, name
) -> None:
    base = big_base()
    paths = [save(fine_tuned(base, t), tmp_path / f"a{t}.safetensors") for t in range(3)]
    base_path = save(base, tmp_path / "base.safetensors")
    planned = Merger(base_path, name, workers=2)
    chunked = Merger(base_path, name, workers=2)
    reference = Merger(base_path, whole(parse_strategy(name)), workers=2)
    chosen: set[FoldPath] = set()

    def unfused(*args) -> FoldPath:  # the chunked path, where the plan would fuse
        path = plan(*args)
        chosen.add(path)
        return FoldPath.CHUNKED if path is FoldPath.FUSED else path

    for path in paths:
        hashes = {planned.fold(path).content_hash, reference.fold(path).content_hash}
        with monkeypatch.context() as patch:
            patch.setattr(contmerge.fold_run, "plan", unfused)
            hashes.add(chunked.fold(path).content_hash)
        assert len(hashes) == 1
    assert FoldPath.REFERENCE not in chosen  # a full checkpoint's floats all go fast
    merged = zip(planned.iter_merged(), chunked.iter_merged(), reference.iter_merged())
    for (key, a), (_, b), (_, c) in merged:
        assert torch.equal(bits(a), bits(c)), key
        assert torch.equal(bits(b), bits(c)), key
