"""Decentralized scenario: DIMAT vs plain π-averaging (WA) on a topology of agents.

N agents hold shards of one 10-class task (Fashion-MNIST, or scikit-learn digits), IID or
non-IID (whole classes per agent, class c -> agent c mod N, as DIMAT's ``dataloader.py``; 5
agents get 2 classes each). Each starts from its OWN random init and pretrains on its shard
(``pretrain_epochs``, default 100 as the authors). Before any round an **alignability check**
merges the pretrained agents once (DIMAT vs WA vs the endpoints' own accuracy): DIMAT can only
help where a one-shot merge keeps the endpoints' accuracy. Then, every round and for each method
on identical models, data and seeds: all agents merge their neighbourhood synchronously
(round-start models), the merged models are evaluated on the full test set, every agent trains
``local_epochs`` on its own shard (fresh Adam, lr 1e-3, batch 100), and they are evaluated again.

Defaults are the authors' where they differ from ours (``main.sh``/``main.py`` of nsaadati/DIMAT):
fully connected topology with their shortcut (agent 0 merges, everyone gets its model),
BatchNorm momentum left at None after DIMAT's reset (``bn_momentum="cumulative"``), 100 rounds
of 2 local epochs. The model is an MLP 784-h-h-10 with BatchNorm (``--model cnn``: a small
ResNet). The merge's calibration data is each agent's own shard (unlabeled), or, as the
authors' code, the global training set (``--calibration global``).

``run_decentralized(config)`` is the entry point (``prepare_agents`` + ``run_methods``, so a
sweep can reuse pretrained agents); ``add_decentralized_arguments`` / ``main_decentralized``
are the CLI halves for ``contmerge simulate decentralized``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from contmerge.strategies.dimat import (
    TOPOLOGIES,
    MatchDiagnostics,
    PermutationSpec,
    Source,
    Topology,
    cumulative_bn,
    dimat_merge,
    make_topology,
    neighbourhood,
    reset_bn,
    topology_from_matrix,
    weighted_average,
)

from .cnn import AGENT_MODELS, agent_model
from .data import DataConfig, Task, load_suite
from .options import add_no_progress, add_output_dir, names_list, positive_int
from .train import _threads as torch_threads  # 1 thread: small models crawl with 2 when busy

StateDict = dict[str, torch.Tensor]
METHODS = ("dimat", "wa", "wa_bn")
#: after a merge that reset BatchNorm: "cumulative" keeps momentum None for the next local
#: training (the authors' code), "restore" puts the module's momentum (0.1) back
BN_MOMENTUM = ("cumulative", "restore")
DATASET_LABELS = {"fashion": "Fashion-MNIST", "digits": "digits"}
METHOD_LABELS = {"dimat": "DIMAT", "wa": "WA", "wa_bn": "WA + BN reset"}
CALIBRATION_NOTES = {
    "own": (
        "Calibration data: each agent uses its OWN training shard (images only, no labels) for "
        "the activation statistics and BatchNorm resets of its merge; no data leaves an agent. "
        "(The authors' code uses the global training set instead.)"
    ),
    "global": (
        "Calibration data: the GLOBAL training set (all agents' images, no labels), as the "
        "authors' code does; not private, kept for comparison with --calibration own."
    ),
}


@dataclass(frozen=True)
class DecentralizedConfig:
    topology: str = "fc"  # fc | ring | bipartite | disconnected (ignored when pi is given)
    agents: int = 5
    rounds: int = 100  # the authors' merg_itr
    partition: str = "non-iid"  # iid | non-iid
    local_epochs: int = 2
    pretrain_epochs: int = 100  # the authors' checkpoints: 100 epochs from different inits
    dataset: str = "fashion"  # fashion | digits
    n_train: int = 5000  # training images split among the agents (digits: at most ~1250)
    n_test: int = 2000
    calibration: str = "own"  # own: the agent's shard | global: all training images (reference)
    calib_size: int | None = None  # calibration images per agent (None: the whole set)
    batch_size: int = 100
    lr: float = 1e-3
    model: str = "mlp"  # mlp: 784-w-w-10 with BatchNorm | cnn: small ResNet of first width w
    width: int = 128
    seed: int = 0
    methods: tuple[str, ...] = ("dimat", "wa")
    pi: tuple[tuple[float, ...], ...] | None = None  # a custom mixing matrix
    fc_shortcut: bool = True  # FC: agent 0's merge copied to all (the reference's shortcut)
    bn_momentum: str = "cumulative"  # see BN_MOMENTUM
    alignability: bool = True  # one-shot merge of the pretrained agents before the rounds
    output_dir: str | None = "contmerge-runs/decentralized"
    threads: int = 1  # small models gain little from 2; 2 threads crawl on a busy machine
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


QUICK = dict(rounds=2, n_train=1000, n_test=400, local_epochs=1, pretrain_epochs=1, width=8)


def quick_config(**overrides: Any) -> DecentralizedConfig:
    """The test-sized run (a few seconds on 2 cores)."""
    return replace(DecentralizedConfig(), **{**QUICK, **overrides})


def _seed(seed: int, *parts: object) -> int:
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


# ------------------------------------------------------------------------------------------
# Data


def load_task(cfg: DecentralizedConfig) -> Task:
    """One 10-class task with a shared label space, from the offline loaders."""
    if cfg.dataset == "fashion":
        data = DataConfig(
            seed=cfg.seed, n_pretrain=cfg.n_train, n_test=cfg.n_test, use_fashion=True, tasks=()
        )
        return load_suite(data).pretrain  # upright Fashion-MNIST, all 10 classes
    if cfg.dataset == "digits":
        data = DataConfig(
            seed=cfg.seed,
            n_train=cfg.n_train,
            n_test=cfg.n_test,
            use_fashion=True,
            tasks=("digits",),
        )
        return load_suite(data).tasks[0]
    raise ValueError(f"unknown dataset {cfg.dataset!r}; known: fashion, digits")


def partition(labels: torch.Tensor, agents: int, kind: str, seed: int) -> list[torch.Tensor]:
    """Indices of each agent's shard.

    iid: every class dealt round-robin across agents (class-balanced shards). non-iid: class c
    goes whole to agent c mod N, each class trimmed to the smallest class count (as DIMAT).
    """
    rng = np.random.default_rng(_seed(seed, "partition"))
    y = labels.numpy()
    classes = np.unique(y)
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    shards: list[list[int]] = [[] for _ in range(agents)]
    if kind == "iid":
        offset = 0
        for idx in by_class:
            for k, i in enumerate(idx):
                shards[(k + offset) % agents].append(int(i))
            offset += len(idx)  # keep shard sizes within one image of each other
    elif kind == "non-iid":
        if agents > len(classes):
            raise ValueError(f"non-iid needs at most {len(classes)} agents (one class each)")
        m = min(len(idx) for idx in by_class)
        for c, idx in enumerate(by_class):
            shards[c % agents].extend(int(i) for i in idx[:m])
    else:
        raise ValueError(f"unknown partition {kind!r}; known: iid, non-iid")
    return [torch.as_tensor(np.sort(s), dtype=torch.long) for s in shards]


# ------------------------------------------------------------------------------------------
# Local training and evaluation


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> None:
    """Fresh Adam, cross-entropy, shuffled mini-batches (the reference's local step)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
        for i in range(0, len(x), batch)
    )
    return correct / len(x)


def state_bytes(state: StateDict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# ------------------------------------------------------------------------------------------
# One round of merging


Factory = Callable[[], nn.Module]
#: per DIMAT fold: alignment point -> how far its assignment is from the identity
Diagnostics = list[dict[str, MatchDiagnostics]]


def merge_agent(
    method: str,
    own: Source,
    self_weight: float,
    neighbours: Iterable[tuple[float, Source]],
    factory: Factory,
    spec: PermutationSpec,
    calibration: Sequence[torch.Tensor],
    diagnostics: Diagnostics | None = None,
) -> StateDict:
    """One agent's merge of its neighbourhood: DIMAT, WA, or WA followed by a BatchNorm reset.

    Everything it needs is an argument (models as state dicts, files or loaders), so any process
    can run it. ``diagnostics`` (DIMAT only) is extended with one entry per folded neighbour.
    """
    if method == "dimat":
        return dimat_merge(
            own, self_weight, neighbours, model_factory=factory, spec=spec,
            calibration=calibration, diagnostics=diagnostics,
        )  # fmt: skip
    if method in ("wa", "wa_bn"):
        merged = weighted_average([(self_weight, own), *neighbours])
        if method == "wa_bn":  # ablation: WA plus the same BatchNorm reset DIMAT does
            model = factory()
            model.load_state_dict(merged)
            merged = {k: v.detach() for k, v in reset_bn(model, calibration).state_dict().items()}
        return merged
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def uses_shortcut(topology: Topology, fc_shortcut: bool) -> bool:
    """The reference's FC shortcut applies when asked for, to FC (or a custom π whose rows are
    all the same); a ring of 3 has FC's π, but the reference only takes the shortcut for FC."""
    same_rows = bool(np.allclose(topology.pi, topology.pi[0]))
    return fc_shortcut and topology.n > 1 and same_rows and topology.name in ("fc", "custom")


def merge_round(
    method: str,
    states: Sequence[StateDict],
    topology: Topology,
    calibration: Sequence[Sequence[torch.Tensor]],
    factory: Factory,
    spec: PermutationSpec,
    *,
    fc_shortcut: bool = False,
    diagnostics: Diagnostics | None = None,
) -> list[StateDict]:
    """Every agent merges its neighbourhood from the round-start models (synchronous).

    ``fc_shortcut``: when every row of π is the same (FC), merge for agent 0 only and give
    everyone that model, as the reference code does (``exp == 1``).
    """
    out: list[StateDict] = []
    shortcut = uses_shortcut(topology, fc_shortcut)
    for i in range(topology.n):
        if shortcut and i > 0:
            out.append({k: v.clone() for k, v in out[0].items()})
            continue
        self_w, nbrs = neighbourhood(topology, i)
        sources = [(w, states[j]) for j, w in nbrs]
        out.append(
            merge_agent(
                method, states[i], self_w, sources, factory, spec, calibration[i], diagnostics
            )
        )
    return out


def round_bytes(topology: Topology, model_bytes: int, fc_shortcut: bool) -> int:
    """Bytes of models sent per round: every agent receives each neighbour's model; with the
    FC shortcut, N−1 models go to agent 0 and its merge goes back to the N−1 others."""
    if uses_shortcut(topology, fc_shortcut):
        return 2 * (topology.n - 1) * model_bytes
    return sum(topology.degree(i) for i in range(topology.n)) * model_bytes


def resets_bn(method: str) -> bool:
    return method in ("dimat", "wa_bn")


def trainable(
    factory: Factory, state: StateDict, method: str | None, bn_momentum: str
) -> nn.Module:
    """A module holding ``state`` for local training. After a merge that reset BatchNorm, the
    authors' code trains with momentum None (``bn_momentum="cumulative"``)."""
    if bn_momentum not in BN_MOMENTUM:
        raise ValueError(f"bn_momentum must be one of {', '.join(BN_MOMENTUM)}")
    model = factory()
    model.load_state_dict(state)
    if method is not None and resets_bn(method) and bn_momentum == "cumulative":
        cumulative_bn(model)
    return model


def summarise_diagnostics(diagnostics: Diagnostics) -> dict[str, float]:
    """Means over folds and alignment points (empty dict when nothing was folded)."""
    entries = [d for fold in diagnostics for d in fold.values()]
    if not entries:
        return {}
    return {
        "identity": float(np.mean([d.identity for d in entries])),
        "matched_corr": float(np.mean([d.matched for d in entries])),
        "diagonal_corr": float(np.mean([d.diagonal for d in entries])),
    }


# ------------------------------------------------------------------------------------------
# The run


def calibration_batches(
    x: torch.Tensor, config: DecentralizedConfig, agent: int
) -> list[torch.Tensor]:
    """Agent ``agent``'s calibration inputs, shuffled once and cut into fixed batches: every
    pass of its merge sees exactly the same batches."""
    gen = torch.Generator().manual_seed(_seed(config.seed, "calib", agent))
    order = torch.randperm(len(x), generator=gen)[: config.calib_size or None]
    return list(x[order].split(config.batch_size))


def check_config(config: DecentralizedConfig) -> Topology:
    """Validate the choices; returns the topology."""
    if config.calibration not in CALIBRATION_NOTES:
        raise ValueError(f"calibration must be one of {', '.join(CALIBRATION_NOTES)}")
    if config.bn_momentum not in BN_MOMENTUM:
        raise ValueError(f"bn_momentum must be one of {', '.join(BN_MOMENTUM)}")
    if config.model not in AGENT_MODELS:
        raise ValueError(f"model must be one of {', '.join(AGENT_MODELS)}")
    for m in config.methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    return (
        topology_from_matrix(config.pi)
        if config.pi is not None
        else make_topology(config.topology, config.agents)
    )


def run_decentralized(config: DecentralizedConfig) -> dict[str, Any]:
    """Pretrain N agents, check alignability, run every method for ``rounds`` rounds, write
    the reports."""
    topology = check_config(config)
    with torch_threads(config.threads):
        results = run_methods(config, topology, prepare_agents(config, topology.n))
    if config.output_dir:
        write_reports(results, Path(config.output_dir))
    return results


def _log(config: DecentralizedConfig, msg: str) -> None:
    if config.progress:
        print(msg, flush=True)


@dataclass
class Agents:
    """The pretrained agents of one (data, partition, model, seed): reusable across topologies
    and methods."""

    task: Task
    shards: list[torch.Tensor]
    xs: list[torch.Tensor]
    ys: list[torch.Tensor]
    calibration: list[list[torch.Tensor]]
    factory: Factory
    spec: PermutationSpec
    pretrained: list[StateDict]
    initial: list[float]
    alignability: dict[str, Any] | None
    seconds: float

    def evaluate(self, states: Sequence[StateDict]) -> list[float]:
        model = self.factory()
        accs = []
        for s in states:
            model.load_state_dict(s)
            accs.append(accuracy(model, self.task.x_test, self.task.y_test))
        return accs


def prepare_agents(config: DecentralizedConfig, n: int) -> Agents:
    """Load the data, split it, pretrain every agent from its own init, run the alignability
    check (when ``config.alignability``)."""
    t0 = time.perf_counter()
    task = load_task(config)
    shards = partition(task.y_train, n, config.partition, config.seed)
    factory, spec = agent_model(config.model, config.width, task.num_classes)
    xs = [task.x_train[s] for s in shards]
    ys = [task.y_train[s] for s in shards]
    calibration = [
        calibration_batches(x if config.calibration == "own" else task.x_train, config, i)
        for i, x in enumerate(xs)
    ]
    _log(config, CALIBRATION_NOTES[config.calibration])
    _log(
        config,
        f"{n} agents, partition {config.partition}: shard sizes {[len(s) for s in shards]}, "
        f"classes per agent {[sorted(set(y.tolist())) for y in ys]}",
    )
    pretrained: list[StateDict] = []
    for i in range(n):
        torch.manual_seed(_seed(config.seed, "init", i))
        model = factory()
        train_local(
            model,
            xs[i],
            ys[i],
            epochs=config.pretrain_epochs,
            lr=config.lr,
            batch_size=config.batch_size,
            seed=_seed(config.seed, "pretrain", i),
        )
        pretrained.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    agents = Agents(task, shards, xs, ys, calibration, factory, spec, pretrained, [], None, 0.0)
    agents.initial = agents.evaluate(pretrained)
    _log(
        config,
        f"pretrained {config.pretrain_epochs} epochs: mean test acc {np.mean(agents.initial):.4f}",
    )
    if config.alignability and n >= 2:
        agents.alignability = alignability_check(agents)
        _log(config, alignability_text(agents.alignability))
    agents.seconds = time.perf_counter() - t0
    return agents


def alignability_check(agents: Agents) -> dict[str, Any]:
    """One-shot merges of the pretrained agents, anchored on agent 0 with its calibration data:
    agents 0 and 1 (½ each) and all N (1/N each), DIMAT vs WA, against the endpoints' own
    accuracies. DIMAT keeping the endpoints' accuracy where WA loses it is the regime where
    the paper's claims can hold."""
    states, calib = agents.pretrained, agents.calibration[0]
    out: dict[str, Any] = {"endpoints": float(np.mean(agents.initial))}
    for name, members in (("pair", states[:2]), ("all", states)):
        w = 1.0 / len(members)
        nbrs = [(w, s) for s in members[1:]]
        diagnostics: Diagnostics = []
        dimat = merge_agent(
            "dimat", members[0], w, nbrs, agents.factory, agents.spec, calib, diagnostics
        )
        wa = merge_agent("wa", members[0], w, nbrs, agents.factory, agents.spec, calib)
        dimat_acc, wa_acc = agents.evaluate([dimat, wa])
        out[name] = {
            "agents": len(members),
            "endpoints": float(np.mean(agents.initial[: len(members)])),
            "dimat": dimat_acc,
            "wa": wa_acc,
            **summarise_diagnostics(diagnostics),
        }
    return out


def alignability_text(check: dict[str, Any]) -> str:
    lines = ["alignability check (one-shot merge of the pretrained agents, before any round):"]
    for name in ("pair", "all"):
        c = check[name]
        lines.append(
            f"  {c['agents']} agents: endpoints {c['endpoints']:.4f}, DIMAT {c['dimat']:.4f}, "
            f"WA {c['wa']:.4f}; matched correlation {c['matched_corr']:.3f} "
            f"(same index {c['diagonal_corr']:.3f})"
        )
    pair = check["pair"]
    if pair["dimat"] < pair["endpoints"] - 0.05:
        lines.append(
            "  WARNING: DIMAT's one-shot merge loses more than 5 points against the endpoints: "
            "the models are not alignable here (wider model or longer pretraining needed)"
        )
    return "\n".join(lines)


def run_methods(config: DecentralizedConfig, topology: Topology, agents: Agents) -> dict[str, Any]:
    """Every method for ``config.rounds`` rounds from the same pretrained agents."""
    t0 = time.perf_counter()
    n = topology.n
    if len(agents.pretrained) != n:
        raise ValueError(f"{len(agents.pretrained)} pretrained agents for a topology of {n}")
    model_bytes = state_bytes(agents.pretrained[0])
    bytes_per_round = round_bytes(topology, model_bytes, config.fc_shortcut)
    _log(
        config,
        f"topology {topology.name} (N={n}"
        f"{', shortcut' if uses_shortcut(topology, config.fc_shortcut) else ''}): "
        f"{bytes_per_round:,} bytes per round",
    )
    runs: dict[str, dict[str, Any]] = {}
    for method in config.methods:
        states = copy.deepcopy(agents.pretrained)
        rec: dict[str, Any] = {
            "merged": [],
            "trained": [],
            "merged_per_agent": [],
            "trained_per_agent": [],
            "matching": [],
            "merge_seconds": [],
            "train_seconds": [],
        }
        for r in range(1, config.rounds + 1):
            t = time.perf_counter()
            diagnostics: Diagnostics = []
            states = merge_round(
                method,
                states,
                topology,
                agents.calibration,
                agents.factory,
                agents.spec,
                fc_shortcut=config.fc_shortcut,
                diagnostics=diagnostics,
            )
            rec["merge_seconds"].append(time.perf_counter() - t)
            rec["matching"].append(summarise_diagnostics(diagnostics))
            merged_acc = agents.evaluate(states)
            t = time.perf_counter()
            trained = []
            for i in range(n):
                model = trainable(agents.factory, states[i], method, config.bn_momentum)
                train_local(
                    model,
                    agents.xs[i],
                    agents.ys[i],
                    epochs=config.local_epochs,
                    lr=config.lr,
                    batch_size=config.batch_size,
                    seed=_seed(config.seed, "train", i, r),
                )
                trained.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            states = trained
            rec["train_seconds"].append(time.perf_counter() - t)
            trained_acc = agents.evaluate(states)
            rec["merged"].append(float(np.mean(merged_acc)))
            rec["trained"].append(float(np.mean(trained_acc)))
            rec["merged_per_agent"].append(merged_acc)
            rec["trained_per_agent"].append(trained_acc)
            _log(
                config,
                f"{METHOD_LABELS[method]:>6} round {r}: after merge "
                f"{rec['merged'][-1]:.4f}, after training {rec['trained'][-1]:.4f}",
            )
        runs[method] = rec

    task = agents.task
    return {
        "config": config.to_dict(),
        "topology": {"name": topology.name, "pi": topology.pi.tolist()},
        "dataset": DATASET_LABELS[config.dataset],
        "num_classes": task.num_classes,
        "shard_sizes": [len(s) for s in agents.shards],
        "calibration": CALIBRATION_NOTES[config.calibration],
        "calibration_images_per_agent": [sum(len(b) for b in c) for c in agents.calibration],
        "model_parameters": sum(p.numel() for p in agents.factory().parameters()),
        "model_bytes": model_bytes,
        "bytes_per_round": bytes_per_round,
        "shortcut": uses_shortcut(topology, config.fc_shortcut),
        "initial_accuracy": float(np.mean(agents.initial)),
        "initial_per_agent": agents.initial,
        "alignability": agents.alignability,
        "runs": runs,
        "pretrain_seconds": agents.seconds,
        "seconds": agents.seconds + time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------------
# Reports


def markdown_table(results: dict[str, Any]) -> str:
    cfg, runs = results["config"], results["runs"]
    methods = list(runs)
    head = (
        "| round | "
        + " | ".join(f"{METHOD_LABELS[m]} merged | {METHOD_LABELS[m]} trained" for m in methods)
        + " | bytes sent |"
    )
    lines = [
        f"Mean test accuracy over {len(results['shard_sizes'])} agents ({results['dataset']}, "
        f"{cfg['partition']}, topology {results['topology']['name']}, "
        f"{cfg['local_epochs']} local epoch(s)/round). 'merged' = right after the merge, "
        f"'trained' = after local training.",
        "",
        head,
        "|" + "---|" * (2 + 2 * len(methods)),
        "| 0 (pretrained) | "
        + " | ".join(f"{results['initial_accuracy']:.4f} | –" for _ in methods)
        + " | 0 |",
    ]
    for r in range(cfg["rounds"]):
        cells = " | ".join(
            f"{runs[m]['merged'][r]:.4f} | {runs[m]['trained'][r]:.4f}" for m in methods
        )
        lines.append(f"| {r + 1} | {cells} | {results['bytes_per_round']:,} |")
    lines += ["", results["calibration"]]
    if results.get("alignability"):
        lines += ["", alignability_text(results["alignability"])]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    rounds = np.arange(1, results["config"]["rounds"] + 1)
    for k, (method, rec) in enumerate(results["runs"].items()):
        color = f"C{k}"
        label = METHOD_LABELS[method]
        ax.plot(rounds, rec["merged"], "-o", color=color, label=f"{label} (after merge)")
        ax.plot(
            rounds,
            rec["trained"],
            "--",
            color=color,
            alpha=0.7,
            label=f"{label} (after local training)",
        )
    ax.axhline(results["initial_accuracy"], color="gray", lw=0.8, label="pretrained agents")
    cfg = results["config"]
    ax.set_title(
        f"{results['dataset']}, {cfg['partition']}, {results['topology']['name']}, "
        f"N={len(results['shard_sizes'])}"
    )
    ax.set_xlabel("round")
    ax.set_ylabel("mean test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(results: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.md").write_text(markdown_table(results))
    plot(results, out_dir / "accuracy.png")


# ------------------------------------------------------------------------------------------
# CLI


def add_decentralized_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = DecentralizedConfig()
    parser.add_argument("--topology", choices=TOPOLOGIES, default=d.topology,
                        help=f"who merges with whom (default {d.topology})")  # fmt: skip
    parser.add_argument(
        "--pi-file",
        default=None,
        help="JSON file with a row-stochastic mixing matrix (list of rows, or "
        "an object with a 'pi' key); overrides --topology/--agents",
    )
    parser.add_argument("--agents", type=positive_int, default=d.agents,
                        help=f"number of agents (default {d.agents})")  # fmt: skip
    parser.add_argument("--rounds", type=positive_int, default=None, help=f"default {d.rounds}")
    parser.add_argument(
        "--partition",
        choices=("iid", "non-iid"),
        default=d.partition,
        help=f"how the training images are split (default {d.partition})",
    )
    parser.add_argument(
        "--local-epochs", type=positive_int, default=None, help=f"default {d.local_epochs}"
    )
    parser.add_argument(
        "--pretrain-epochs", type=positive_int, default=None, help=f"default {d.pretrain_epochs}"
    )
    parser.add_argument(
        "--dataset",
        choices=("fashion", "digits"),
        default=d.dataset,
        help=f"Fashion-MNIST or scikit-learn's digits (default {d.dataset})",
    )
    parser.add_argument(
        "--n-train",
        type=positive_int,
        default=None,
        help=f"training images split among agents (default {d.n_train})",
    )
    parser.add_argument("--n-test", type=positive_int, default=None, help=f"default {d.n_test}")
    parser.add_argument(
        "--calibration",
        choices=tuple(CALIBRATION_NOTES),
        default=d.calibration,
        help="own: each agent's shard (default, private); global: the whole training set, as "
        "the authors' code (for comparison only)",
    )
    parser.add_argument(
        "--calib-size",
        type=positive_int,
        default=None,
        help="calibration images per agent (default: all of its calibration set)",
    )
    parser.add_argument(
        "--model",
        choices=AGENT_MODELS,
        default=d.model,
        help="mlp: 784-w-w-10 with BatchNorm (default); cnn: a small ResNet of first width w",
    )
    parser.add_argument(
        "--width",
        type=positive_int,
        default=None,
        help=f"MLP hidden units or CNN first width (default {d.width})",
    )
    parser.add_argument(
        "--bn-momentum",
        choices=BN_MOMENTUM,
        default=d.bn_momentum,
        help="after DIMAT's BatchNorm reset: cumulative = momentum None for the next training "
        "(the authors' code, default); restore = momentum 0.1",
    )
    parser.add_argument(
        "--no-alignability",
        action="store_true",
        help="skip the one-shot merge of the pretrained agents before the rounds",
    )
    parser.add_argument(
        "--methods",
        default=",".join(d.methods),
        help=f"comma-separated subset of {', '.join(METHODS)}",
    )
    parser.add_argument(
        "--fc-shortcut",
        action=argparse.BooleanOptionalAction,
        default=d.fc_shortcut,
        help="FC only: merge for agent 0 and copy it to every agent, as the authors' code "
        "(default on; --no-fc-shortcut: every agent merges with its own calibration data)",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="data split and training seed")
    add_output_dir(parser, d.output_dir)
    parser.add_argument(
        "--threads", type=positive_int, default=d.threads, help="torch threads (1 or 2)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny run (< 1 min), for tests")
    add_no_progress(parser, "the per-round log")
    return parser


def config_from_args(args: argparse.Namespace) -> DecentralizedConfig:
    base = quick_config() if args.quick else DecentralizedConfig()
    pi = None
    if args.pi_file:
        raw = json.loads(Path(args.pi_file).read_text())
        pi = tuple(
            tuple(float(v) for v in row) for row in (raw["pi"] if isinstance(raw, dict) else raw)
        )
    picked = {
        "rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "pretrain_epochs": args.pretrain_epochs,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "width": args.width,
    }
    return replace(
        base,
        **{k: v for k, v in picked.items() if v is not None},
        topology=args.topology,
        agents=len(pi) if pi else args.agents,
        partition=args.partition,
        dataset=args.dataset,
        calibration=args.calibration,
        calib_size=args.calib_size,
        methods=names_list(args.methods),
        seed=args.seed,
        pi=pi,
        model=args.model,
        bn_momentum=args.bn_momentum,
        alignability=not args.no_alignability,
        fc_shortcut=args.fc_shortcut,
        output_dir=args.output_dir or base.output_dir,
        threads=args.threads,
        progress=not args.no_progress,
    )


def main_decentralized(args: argparse.Namespace) -> int:
    results = run_decentralized(config_from_args(args))
    print(markdown_table(results), end="")
    print(
        f"bytes communicated per round (all agents): {results['bytes_per_round']:,} "
        f"({results['model_bytes']:,} bytes per model); {results['seconds']:.1f} s"
    )
    if results["config"]["output_dir"]:
        print(f"reports: {results['config']['output_dir']}/results.{{json,md}}, accuracy.png")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m contmerge.simulations.decentralized`` (same options as the CLI command)."""
    parser = add_decentralized_arguments(
        argparse.ArgumentParser(description=__doc__.splitlines()[0])
    )
    return main_decentralized(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
