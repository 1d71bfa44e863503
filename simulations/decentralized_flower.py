"""The decentralized DIMAT scenario through Flower: the server only relays models.

Each round the ServerApp sends every agent (a SuperNode) its own model and its neighbours'
models with the π row; the ClientApp merges them with DIMAT (or WA) on its OWN shard, evaluates,
trains locally on its shard and replies with its new model. Merging and training happen only on
the clients; the server keeps the N round-start models it relays. Data, seeds and computations
are those of :mod:`contmerge.simulations.decentralized`, so a Flower run reproduces
``run_decentralized`` number for number (the tests check this).

The neighbours arrive in one message; the client converts each to tensors only when it is folded.
Agent i is the i-th SuperNode in sorted node-id order; it rebuilds its shard from the config.
With the authors' FC shortcut (the default for FC), a round has two phases: agent 0 alone merges
its neighbourhood and replies with the merged model; then every agent receives that model, and
evaluates and trains it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, fields
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from contmerge.flower.arrays import from_array_record, to_array_record
from contmerge.strategies.dimat import make_topology, topology_from_matrix

from . import decentralized as dz
from .cnn import agent_model

StateDict = dict[str, torch.Tensor]


def config_to_json(cfg: dz.DecentralizedConfig) -> str:
    return json.dumps(asdict(cfg))


def config_from_json(text: str) -> dz.DecentralizedConfig:
    raw = json.loads(text)
    raw["methods"] = tuple(raw["methods"])
    if raw.get("pi") is not None:
        raw["pi"] = tuple(tuple(row) for row in raw["pi"])
    names = {f.name for f in fields(dz.DecentralizedConfig)}
    return dz.DecentralizedConfig(**{k: v for k, v in raw.items() if k in names})


# ------------------------------------------------------------------------------------------
# Client side: everything an agent knows is its own shard (rebuilt from the config) and the
# models it receives.


@lru_cache(maxsize=4)
def _agent_data(cfg_json: str, agent: int) -> tuple[Any, ...]:
    cfg = config_from_json(cfg_json)
    task = dz.load_task(cfg)
    n = len(cfg.pi) if cfg.pi is not None else cfg.agents
    shard = dz.partition(task.y_train, n, cfg.partition, cfg.seed)[agent]
    x, y = task.x_train[shard], task.y_train[shard]
    calib_source = x if cfg.calibration == "own" else task.x_train
    calibration = dz.calibration_batches(calib_source, cfg, agent)
    factory, spec = agent_model(cfg.model, cfg.width, task.num_classes)
    return x, y, calibration, task.x_test, task.y_test, factory, spec


def _loader(record: ArrayRecord):
    return lambda: from_array_record(record, "neighbour")


def agent_step(msg: Message, context: Context) -> Message:
    """On this agent only: pretrain (round 0); or, in a round, merge + evaluate + train
    (phase "step"), merge only and reply with the merged model (phase "merge", agent 0 under
    the FC shortcut), or evaluate + train a model merged elsewhere (phase "train")."""
    config = msg.content["config"]
    cfg_json = str(config["cfg"])
    cfg = config_from_json(cfg_json)
    agent, rnd = int(config["agent"]), int(config["round"])  # type: ignore[arg-type]
    phase = str(config.get("phase", "step"))
    torch.set_num_threads(max(1, min(2, cfg.threads)))
    x, y, calibration, x_test, y_test, factory, spec = _agent_data(cfg_json, agent)

    metrics: dict[str, float] = {}
    if rnd == 0:  # different random init per agent, local pretraining
        torch.manual_seed(dz._seed(cfg.seed, "init", agent))
        model = factory()
        epochs, seed = cfg.pretrain_epochs, dz._seed(cfg.seed, "pretrain", agent)
    else:
        method = str(config["method"])
        if phase == "train":
            merged = from_array_record(msg.content["self"], "merged model")  # type: ignore[arg-type]
        else:
            weights = json.loads(str(config["weights"]))  # [[j, π_ij], ...]
            own = from_array_record(msg.content["self"], "own model")  # type: ignore[arg-type]
            # Each neighbour is converted from its ArrayRecord only when it is folded.
            neighbours = [(float(w), _loader(msg.content[f"n{j}"])) for j, w in weights]
            merged = dz.merge_agent(
                method,
                own,
                float(config["self-weight"]),  # type: ignore[arg-type]
                neighbours,
                factory,
                spec,
                calibration,
            )
        if phase == "merge":
            return Message(RecordDict({"arrays": to_array_record(merged)}), reply_to=msg)
        model = dz.trainable(factory, merged, method, cfg.bn_momentum)
        metrics["merged-acc"] = dz.accuracy(model, x_test, y_test)
        epochs, seed = cfg.local_epochs, dz._seed(cfg.seed, "train", agent, rnd)
    dz.train_local(model, x, y, epochs=epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=seed)
    metrics["trained-acc"] = dz.accuracy(model, x_test, y_test)
    content = RecordDict(
        {"arrays": to_array_record(model.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content, reply_to=msg)


def make_client_app() -> ClientApp:
    app = ClientApp()
    app.train()(agent_step)
    return app


# ------------------------------------------------------------------------------------------
# Server side: a relay.


def _ask(grid: Grid, messages: list[Message], timeout: float) -> dict[int, RecordDict]:
    replies: dict[int, RecordDict] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
        replies[reply.metadata.src_node_id] = reply.content
    if len(replies) != len(messages):
        raise RuntimeError(f"only {len(replies)} of {len(messages)} agents replied")
    return replies


def server_app(
    cfg: dz.DecentralizedConfig, out: dict[str, Any], timeout: float = 900.0
) -> ServerApp:
    topology = (
        topology_from_matrix(cfg.pi)
        if cfg.pi is not None
        else make_topology(cfg.topology, cfg.agents)
    )
    cfg_json = config_to_json(cfg)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        nodes: list[int] = []
        while len(nodes) < topology.n:
            nodes = sorted(grid.get_node_ids())
            time.sleep(0.2 if len(nodes) < topology.n else 0)
        nodes = nodes[: topology.n]

        def msg(i: int, records: dict[str, Any]) -> Message:
            return Message(RecordDict(records), dst_node_id=nodes[i], message_type="train")

        def base(i: int, rnd: int, **extra: Any) -> ConfigRecord:
            return ConfigRecord({"cfg": cfg_json, "agent": i, "round": rnd, **extra})

        replies = _ask(grid, [msg(i, {"config": base(i, 0)}) for i in range(topology.n)], timeout)
        pretrained = [replies[nodes[i]]["arrays"] for i in range(topology.n)]
        out["initial_accuracy"] = float(
            np.mean([replies[nodes[i]]["metrics"]["trained-acc"] for i in range(topology.n)])
        )
        out["runs"] = {}
        shortcut = dz.uses_shortcut(topology, cfg.fc_shortcut)

        def neighbourhood(states: list, i: int, rnd: int, method: str, phase: str) -> Message:
            nbrs = [(j, float(topology.pi[i, j])) for j in topology.neighbours(i)]
            extra = {"self-weight": float(topology.pi[i, i]), "weights": json.dumps(nbrs)}
            records: dict[str, Any] = {
                "config": base(i, rnd, method=method, phase=phase, **extra),
                "self": states[i],
                **{f"n{j}": states[j] for j, _ in nbrs},
            }
            return msg(i, records)

        for method in cfg.methods:
            states = list(pretrained)  # ArrayRecords: relayed as received
            rec: dict[str, list[float]] = {"merged": [], "trained": []}
            for rnd in range(1, cfg.rounds + 1):
                if shortcut:  # agent 0 merges; every agent trains its merge
                    merged = _ask(grid, [neighbourhood(states, 0, rnd, method, "merge")], timeout)
                    train = {"method": method, "phase": "train"}
                    model = merged[nodes[0]]["arrays"]
                    messages = [
                        msg(i, {"config": base(i, rnd, **train), "self": model})
                        for i in range(topology.n)
                    ]
                else:
                    messages = [
                        neighbourhood(states, i, rnd, method, "step") for i in range(topology.n)
                    ]
                replies = _ask(grid, messages, timeout)
                states = [replies[nodes[i]]["arrays"] for i in range(topology.n)]
                for key in ("merged", "trained"):
                    rec[key].append(
                        float(
                            np.mean(
                                [
                                    replies[nodes[i]]["metrics"][f"{key}-acc"]
                                    for i in range(topology.n)
                                ]
                            )
                        )
                    )
            out["runs"][method] = rec

    return app


def run_decentralized_flower(cfg: dz.DecentralizedConfig) -> dict[str, Any]:
    """Run the scenario on Flower's simulation engine; returns per-round mean accuracies."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from flwr.simulation import run_simulation

    from contmerge.flower.simulate import backend_config

    n = len(cfg.pi) if cfg.pi is not None else cfg.agents
    out: dict[str, Any] = {}
    started = time.perf_counter()
    run_simulation(
        server_app=server_app(cfg, out),
        client_app=make_client_app(),
        num_supernodes=n,
        backend_config=backend_config(),
    )  # type: ignore[arg-type]
    if "runs" not in out or len(out["runs"]) != len(cfg.methods):
        raise RuntimeError("the Flower simulation ended without results")
    return {
        "config": asdict(cfg),
        **out,
        "seconds": time.perf_counter() - started,
        "calibration": dz.CALIBRATION_NOTES[cfg.calibration],
    }


def main(argv: list[str] | None = None) -> int:
    parser = dz.add_decentralized_arguments(
        argparse.ArgumentParser(description=__doc__.splitlines()[0])
    )
    cfg = dz.config_from_args(parser.parse_args(argv))
    print(dz.CALIBRATION_NOTES[cfg.calibration])
    result = run_decentralized_flower(cfg)
    print(json.dumps({k: result[k] for k in ("initial_accuracy", "runs", "seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    # Ray pickles the ClientApp's functions by module: run them from the package, not __main__.
    from contmerge.simulations.decentralized_flower import main as package_main

    raise SystemExit(package_main())
