"""A contmerge strategy against Flower's own FedAvg, in one run of Flower's simulation engine.

One ``run_simulation`` (Ray backend, one CPU per virtual client) whose ServerApp runs the
contmerge strategy for R rounds, then FedAvg for R rounds, from the same θ0 and with the same
clients, partition and local-training seeds. The server evaluates the global backbone after every
round on every task's test set (each with its frozen head).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result

from .arrays import from_array_record, to_array_record
from .client import HEADS_KEY, SCENARIO_KEY, make_client_app
from .scenario import DEFAULT_CACHE, Prepared, Scenario, heads_to_bytes, prepare
from .strategy import ContmergeStrategy, MergeMode

FEDAVG = "fedavg"

# ``contmerge.simulations.cli`` looks the command up here by these names.
from .cli import add_federated_arguments, main_federated  # noqa: E402

__all__ = ["FederatedRun", "add_federated_arguments", "main_federated", "run_federated"]


@dataclass
class FederatedRun:
    """One comparison: which contmerge strategy, how many clients and rounds, which data."""

    strategy: str = "opcm"
    merge: MergeMode = "round"
    clients: int = 4
    rounds: int = 5
    scenario: Scenario = field(default_factory=Scenario)
    streaming: bool = True  # start_streaming (fold as pulled) or the drop-in strategy.start
    baseline: bool = True  # also run Flower's FedAvg
    timeout: float = 900.0  # per round
    cache_dir: str = str(DEFAULT_CACHE)

    @property
    def label(self) -> str:
        return f"{self.strategy} ({self.merge})"


def server_app(run: FederatedRun, prepared: Prepared, out: dict[str, Any]) -> ServerApp:
    """The ServerApp: runs both strategies and leaves their results in ``out``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        train_config = ConfigRecord(
            {SCENARIO_KEY: run.scenario.to_json(), HEADS_KEY: heads_to_bytes(prepared.heads)}
        )
        sampling = {
            "fraction_train": 1.0,
            "fraction_evaluate": 0.0,  # evaluation is central, on the test sets
            "min_train_nodes": run.clients,
            "min_available_nodes": run.clients,
        }
        contenders: list[tuple[str, FedAvg]] = [
            (run.label, ContmergeStrategy(run.strategy, merge=run.merge, **sampling))
        ]
        if run.baseline:
            contenders.append((FEDAVG, FedAvg(**sampling)))
        for name, strategy in contenders:
            started = time.perf_counter()
            result = _start(strategy, run, grid, prepared, train_config)
            out[name] = {
                "accuracy": {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()},
                "train_loss": {
                    r: float(m["train-loss"])  # type: ignore[arg-type]
                    for r, m in result.train_metrics_clientapp.items()
                    if "train-loss" in m
                },
                "seconds": time.perf_counter() - started,
            }
            if isinstance(strategy, ContmergeStrategy):
                out[name]["rounds"] = [asdict(r) for r in strategy.reports]
                strategy.close()

    return app


def _start(
    strategy: FedAvg, run: FederatedRun, grid: Grid, prepared: Prepared, config: ConfigRecord
) -> Result:
    def evaluate(_round: int, arrays: ArrayRecord) -> MetricRecord:
        return MetricRecord(prepared.accuracy(from_array_record(arrays)))

    start = strategy.start
    if isinstance(strategy, ContmergeStrategy) and run.streaming:
        start = strategy.start_streaming
    return start(
        grid=grid,
        initial_arrays=to_array_record(prepared.base),
        num_rounds=run.rounds,
        timeout=run.timeout,
        train_config=config,
        evaluate_fn=evaluate,
    )


def backend_config(cpus: int | None = None) -> dict[str, Any]:
    """Ray backend: one CPU per virtual client, as many clients in parallel as cores."""
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus or os.cpu_count() or 1, "log_to_driver": False},
    }


def run_federated(run: FederatedRun, *, progress: bool = True) -> dict[str, Any]:
    """Run the comparison; returns the results (see :mod:`contmerge.flower.report`)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from flwr.simulation import run_simulation

    prepared = prepare(run.scenario, run.cache_dir, progress=progress)
    out: dict[str, Any] = {}
    started = time.perf_counter()
    run_simulation(
        server_app=server_app(run, prepared, out),
        client_app=make_client_app(),
        num_supernodes=run.clients,
        backend_config=backend_config(),  # type: ignore[arg-type]
    )
    missing = [
        name for name in (run.label, FEDAVG if run.baseline else None) if name and name not in out
    ]
    if missing:
        raise RuntimeError(f"the simulation ended without results for {missing}")
    return {
        "config": {**asdict(run), "scenario": asdict(run.scenario)},
        "sources": prepared.sources,
        "tasks": prepared.task_names,
        "seconds": time.perf_counter() - started,
        "strategies": out,
    }
