"""The federated task scenario on real offline data: what the server prepares, what clients train.

Built on the rest of ``contmerge.simulations`` (Fashion-MNIST and scikit-learn digits tasks, the
MLP backbone, fixed class-mean cosine heads): the server holds the pretrained backbone θ0 and one
frozen head per task, and evaluates the global backbone on every task's test set with that
task's head. Clients train the backbone on their partition (mixing tasks, each sample through
its task's head) and never see the test sets.

Clients are stateless: the train message carries the :class:`Scenario` (JSON) and the heads
(safetensors bytes) in its ConfigRecord, next to the backbone, so the same ClientApp serves the
in-process simulation, ``flwr run`` and real SuperNodes; a client only needs its partition id.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from ..data import DataConfig, TaskSuite
from ..data import load_suite as load_task_suite
from ..evaluate import Evaluator
from ..models import Backbone, ModelConfig, StateDict, head_from_state
from ..train import CheckpointCache, TrainConfig
from .partition import Part, parse_partition, partition

DEFAULT_CACHE = Path(os.environ.get("CONTMERGE_CACHE", Path.home() / ".cache" / "contmerge"))


@dataclass(frozen=True)
class Scenario:
    """Data and local-training settings every client must agree on."""

    partition: str = "iid"
    tasks: tuple[str, ...] | None = None  # None: the suite's default tasks
    n_train: int = 1000  # per task
    n_test: int = 500  # per task
    seed: int = 0
    local_epochs: int = 1
    lr: float = 5e-4
    batch_size: int = 64

    def __post_init__(self) -> None:
        parse_partition(self.partition)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> Scenario:
        data = json.loads(text)
        if data.get("tasks") is not None:
            data["tasks"] = tuple(data["tasks"])
        return Scenario(**data)

    def data_config(self) -> DataConfig:
        return DataConfig(seed=self.seed, n_train=self.n_train, n_test=self.n_test,
                          tasks=self.tasks)  # fmt: skip


def load_suite(scenario: Scenario) -> TaskSuite:
    """The task suite (cached per process: Ray actors reuse it across rounds)."""
    return _load_suite(scenario.data_config())


@lru_cache(maxsize=2)
def _load_suite(config: DataConfig) -> TaskSuite:
    return load_task_suite(config)


def client_part(scenario: Scenario, partition_id: int, num_partitions: int) -> Part:
    suite = load_suite(scenario)
    labels = [t.y_train.numpy() for t in suite.tasks]
    parts = partition(labels, num_partitions, scenario.partition, seed=scenario.seed)
    return parts[partition_id]


# --- server side --------------------------------------------------------------------------
@dataclass
class Prepared:
    """What the server holds: θ0, the frozen heads, and an evaluator over the test sets."""

    base: StateDict
    heads: dict[str, StateDict]
    task_names: list[str]
    evaluator: Evaluator
    sources: str

    def accuracy(self, backbone: StateDict) -> dict[str, float]:
        """Per-task test accuracy of a backbone, plus their mean under ``"mean"``."""
        state = {k: v.float() for k, v in backbone.items()}
        per_task = self.evaluator.accuracy(state, self.task_names)
        return {**per_task, "mean": sum(per_task.values()) / len(per_task)}


def prepare(
    scenario: Scenario, cache_dir: str | Path = DEFAULT_CACHE, progress: bool = False
) -> Prepared:
    """Pretrain θ0 and build the fixed heads (or load them from the cache)."""
    suite = load_suite(scenario)
    cache = CheckpointCache(suite, scenario.data_config(), ModelConfig(), TrainConfig(),
                            Path(cache_dir) / "simulations", progress=progress)  # fmt: skip
    names = suite.names
    heads = {n: safetensors.torch.load_file(str(cache.head(n))) for n in names}
    base = safetensors.torch.load_file(str(cache.pretrained()))
    return Prepared(base, heads, names, Evaluator(suite.tasks, heads), suite.sources)


def heads_to_bytes(heads: dict[str, StateDict]) -> bytes:
    flat = {f"{task}/{k}": v.contiguous() for task, sd in heads.items() for k, v in sd.items()}
    return safetensors.torch.save(flat)


def heads_from_bytes(blob: bytes) -> dict[str, StateDict]:
    heads: dict[str, StateDict] = {}
    for key, value in safetensors.torch.load(blob).items():
        task, _, name = key.rpartition("/")
        heads.setdefault(task, {})[name] = value
    return heads


# --- client side --------------------------------------------------------------------------
def local_train(
    backbone: StateDict,
    heads: dict[str, StateDict],
    scenario: Scenario,
    partition_id: int,
    num_partitions: int,
    seed: int,
) -> tuple[StateDict, int, float]:
    """Train the backbone on this client's part, each sample through its task's frozen head.

    Returns the new backbone (in the dtypes it came in), the number of samples and the mean
    training loss. Computation is float32 whatever the transport dtype.
    """
    torch.set_num_threads(1)  # one simulated client per core
    suite = load_suite(scenario)
    part = client_part(scenario, partition_id, num_partitions)
    cfg = ModelConfig()
    model = Backbone(cfg)
    model.load_state_dict({k: v.float() for k, v in backbone.items()}, strict=True)
    task_heads = nn.ModuleList(head_from_state(heads[t.name], cfg) for t in suite.tasks)
    task_heads.requires_grad_(False)
    xs, ys, ts = [], [], []
    for t, idx in part.items():
        index = torch.from_numpy(idx).long()
        xs.append(suite.tasks[t].x_train[index])
        ys.append(suite.tasks[t].y_train[index])
        ts.append(torch.full((len(idx),), t))
    x, y, task_of = torch.cat(xs), torch.cat(ys), torch.cat(ts)
    optimizer = torch.optim.Adam(model.parameters(), lr=scenario.lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    total, steps = 0.0, 0
    for _ in range(scenario.local_epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), scenario.batch_size):
            batch = order[start : start + scenario.batch_size]
            loss = _multi_task_loss(model(x[batch]), y[batch], task_of[batch], task_heads)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
    trained = {k: v.detach().to(backbone[k].dtype) for k, v in model.state_dict().items()}
    return trained, len(x), (total / steps) if steps else math.nan


def _multi_task_loss(
    features: torch.Tensor, y: torch.Tensor, task_of: torch.Tensor, heads: nn.ModuleList
) -> torch.Tensor:
    loss = features.new_zeros(())
    for t in task_of.unique().tolist():
        mask = task_of == t
        loss = loss + nn.functional.cross_entropy(
            heads[t](features[mask]), y[mask], reduction="sum"
        )
    return loss / len(y)
