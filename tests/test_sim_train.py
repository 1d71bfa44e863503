"""Training: fine-tuning helps, checkpoints are cached and reused, sequential FT chains."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from contmerge.simulations import data, train
from contmerge.simulations.evaluate import Evaluator, bounds
from contmerge.simulations.models import Backbone, ModelConfig, get_state, set_state

TASKS = (
    ("fashion_rot90", "digits_rot90")
    if data.fashion_available()
    else ("digits_rot90", "digits_invert")
)
DATA = data.DataConfig(n_train=800, n_test=400, n_pretrain=3000, tasks=TASKS)
TRAIN = train.TrainConfig(pretrain_epochs=3, finetune_epochs=4)
MODEL = ModelConfig()


@pytest.fixture(scope="module")
def suite() -> data.TaskSuite:
    return data.load_suite(DATA)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sim-cache")


@pytest.fixture(scope="module")
def prepared(suite: data.TaskSuite, cache_dir: Path) -> tuple[train.Checkpoints, list[list[str]]]:
    orders = [list(TASKS), list(reversed(TASKS))]
    cache = train.CheckpointCache(suite, DATA, MODEL, TRAIN, cache_dir, progress=False)
    return cache.prepare(orders), orders


def test_backbone_state_roundtrip_is_a_plain_dict_of_tensors() -> None:
    net = Backbone(MODEL)
    state = get_state(net)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    linears = {k: v.shape for k, v in state.items() if v.ndim == 2}
    assert linears == {
        "blocks.0.fc.weight": (256, 784),
        "blocks.1.fc.weight": (256, 256),
        "blocks.2.fc.weight": (64, 256),
    }
    other = Backbone(MODEL)
    set_state(other, state)
    x = torch.rand(5, 784)
    assert torch.equal(net.eval()(x), other.eval()(x))
    state["blocks.0.fc.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError):
        set_state(other, state)


def test_finetuned_models_beat_pretrained_on_their_own_task(
    suite: data.TaskSuite, prepared: tuple[train.Checkpoints, list[list[str]]]
) -> None:
    ckpts, _ = prepared
    evaluator = Evaluator(suite.tasks, ckpts.head_states(), MODEL)
    ft = {n: train.load_safetensors(ckpts.independent[n]) for n in TASKS}
    ref = bounds(evaluator, ckpts.base_state(), ft)
    for name in TASKS:
        pre, tuned = ref["pretrained"][name], ref["individual"][name]
        assert tuned > pre + 0.05, (name, pre, tuned)
        assert pre > 1.5 / suite.tasks[suite.names.index(name)].num_classes  # θ0 is not random


def test_cache_is_reused_without_retraining(
    suite: data.TaskSuite,
    cache_dir: Path,
    prepared: tuple[train.Checkpoints, list[list[str]]],
) -> None:
    ckpts, orders = prepared
    files = sorted(ckpts.root.rglob("*.safetensors"))
    # θ0 + 2 heads + 2 independent + 2 sequential (the 1st of each order *is* independent)
    assert len(files) == 7
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    before = dict(train.TRAINING_RUNS)
    again = train.CheckpointCache(suite, DATA, MODEL, TRAIN, cache_dir, progress=False)
    ckpts2 = again.prepare(orders)
    assert dict(train.TRAINING_RUNS) == before
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    assert ckpts2.root == ckpts.root
    # a setting that changes the checkpoints gets its own cache entry
    other = train.CheckpointCache(
        suite, DATA, MODEL, train.TrainConfig(pretrain_epochs=3, finetune_epochs=5), cache_dir,
        progress=False,
    )  # fmt: skip
    assert other.root != ckpts.root
    # thread count does not change checkpoints, so it does not change the key
    same = train.CheckpointCache(
        suite, DATA, MODEL, train.TrainConfig(pretrain_epochs=3, finetune_epochs=4, threads=2),
        cache_dir, progress=False,
    )  # fmt: skip
    assert same.root == ckpts.root


def test_sequential_checkpoints_chain_from_the_previous_task(
    prepared: tuple[train.Checkpoints, list[list[str]]],
) -> None:
    ckpts, orders = prepared
    base = ckpts.base_state()
    for order in orders:
        first, second = ckpts.paths("sequential", order)
        assert first == ckpts.independent[order[0]]  # starts from θ0: same as independent
        seq2 = safetensors.torch.load_file(second)
        ind2 = train.load_safetensors(ckpts.independent[order[1]])
        ind1 = train.load_safetensors(first)
        assert not torch.equal(seq2["blocks.0.fc.weight"], ind2["blocks.0.fc.weight"])

        # the second sequential model is nearer to the first task's model than the independent one
        def dist(a: dict, b: dict) -> float:
            return sum(float((a[k] - b[k]).norm() ** 2) for k in base) ** 0.5

        assert dist(seq2, ind1) < dist(ind2, ind1)
    with pytest.raises(ValueError):
        ckpts.paths("bogus", orders[0])


def test_training_is_deterministic(suite: data.TaskSuite) -> None:
    task = suite.tasks[0]
    cfg = train.TrainConfig(finetune_epochs=1, probe_epochs=2)
    base = get_state(Backbone(MODEL))
    head = train.fit_probe_head(base, task, MODEL, cfg)
    assert torch.equal(head["weight"], train.fit_probe_head(base, task, MODEL, cfg)["weight"])
    a = train.finetune_backbone(base, head, task, MODEL, cfg, seed=1)
    b = train.finetune_backbone(base, head, task, MODEL, cfg, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.fc.weight"], base["blocks.0.fc.weight"])
