"""A contmerge strategy against Flower's own FedAvg, in one run of Flower's simulation engine.

One ``run_simulation`` (Ray backend, one CPU per virtual client) whose ServerApp runs the
contmerge strategy for R rounds, then FedAvg for R rounds, from the same θ0 and with the same
clients, partition and local-training seeds. The server evaluates the global backbone after every
round on every task's test set (each with its frozen head).

Timing is kept apart so that start-up is not charged to a strategy: the simulation's start-up
(Ray, before the ServerApp runs), each round's wall time (clients' training included; the first
round of the first strategy also starts Ray's client actors) and the server's own work per round
(contmerge: folding the replies and emitting the merge; FedAvg: ``aggregate_train``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
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
        out["main_started"] = time.perf_counter()
        contenders: list[tuple[str, FedAvg]] = [
            (run.label, ContmergeStrategy(run.strategy, merge=run.merge, **sampling))
        ]
        if run.baseline:
            contenders.append((FEDAVG, TimedFedAvg(**sampling)))
        for name, strategy in contenders:
            started = time.perf_counter()
            clock = RoundClock()
            result = _start(strategy, run, grid, prepared, train_config, clock)
            out[name] = {
                "accuracy": {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()},
                "train_loss": {
                    r: float(m["train-loss"])  # type: ignore[arg-type]
                    for r, m in result.train_metrics_clientapp.items()
                    if "train-loss" in m
                },
                "seconds": time.perf_counter() - started,
                "round_seconds": clock.rounds(),
            }
            if isinstance(strategy, ContmergeStrategy):
                out[name]["rounds"] = [asdict(r) for r in strategy.reports]
                out[name]["server_seconds"] = {r.server_round: r.fold_seconds
                                               for r in strategy.reports}  # fmt: skip
                strategy.close()
            elif isinstance(strategy, TimedFedAvg):
                out[name]["server_seconds"] = strategy.aggregate_seconds

    return app


class RoundClock:
    """Wall time of each round, from the server-side evaluations that close them: round r runs
    from the end of evaluation r − 1 to the start of evaluation r (evaluation left out)."""

    def __init__(self) -> None:
        self.started: dict[int, float] = {}
        self.ended: dict[int, float] = {}

    @contextmanager
    def evaluation(self, server_round: int) -> Iterator[None]:
        self.started[server_round] = time.perf_counter()
        yield
        self.ended[server_round] = time.perf_counter()

    def rounds(self) -> dict[int, float]:
        return {r: t - self.ended[r - 1] for r, t in self.started.items() if r - 1 in self.ended}


class TimedFedAvg(FedAvg):
    """Flower's FedAvg, unchanged, timing its aggregation: the server's own work each round."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.aggregate_seconds: dict[int, float] = {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        started = time.perf_counter()
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            self.aggregate_seconds[server_round] = time.perf_counter() - started


def _start(
    strategy: FedAvg,
    run: FederatedRun,
    grid: Grid,
    prepared: Prepared,
    config: ConfigRecord,
    clock: RoundClock,
) -> Result:
    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        with clock.evaluation(server_round):
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
    with _quiet_run_simulation_deprecation():
        run_simulation(
            server_app=server_app(run, prepared, out),
            client_app=make_client_app(),
            num_supernodes=run.clients,
            backend_config=backend_config(),  # type: ignore[arg-type]
        )
    startup = out.pop("main_started", started) - started
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
        "startup_seconds": startup,
        "strategies": out,
    }


class _DropRunSimulationDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


@contextmanager
def _quiet_run_simulation_deprecation() -> Iterator[None]:
    """Flower 1.41–1.42 warn that ``run_simulation`` is deprecated in favour of ``flwr run``,
    yet it is their only in-process simulation API (``flwr run`` needs a SuperLink and an app
    on disk: docs/flower.md shows that route). This command calls it on purpose, so the advice
    is noise to its user; every other Flower message still shows."""
    from flwr.common.logger import FLOWER_LOGGER

    quiet = _DropRunSimulationDeprecation()
    FLOWER_LOGGER.addFilter(quiet)
    try:
        yield
    finally:
        FLOWER_LOGGER.removeFilter(quiet)
