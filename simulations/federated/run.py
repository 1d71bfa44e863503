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

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result

from contmerge.flower.arrays import from_array_record, to_array_record
from contmerge.flower.simulate import run_in_process
from contmerge.flower.strategy import ContmergeStrategy, MergeMode

from .client import HEADS_KEY, SCENARIO_KEY, make_client_app
from .scenario import DEFAULT_CACHE, Prepared, Scenario, heads_to_bytes, prepare

FEDAVG = "fedavg"


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


class StrategyResults(TypedDict, total=False):
    """One strategy's run. Once written as JSON and read back, rounds are strings."""

    accuracy: dict[int, dict[str, float]]  # round -> per-task and "mean" test accuracy
    train_loss: dict[int, float]
    seconds: float
    round_seconds: dict[int, float]
    server_seconds: dict[int, float]  # the server's own work per round
    rounds: list[dict[str, Any]]  # contmerge's RoundReports


class FederatedResults(TypedDict):
    """What :func:`run_federated` returns and report.py writes (``results.json``)."""

    config: dict[str, Any]
    sources: str
    tasks: list[str]
    seconds: float
    startup_seconds: float
    strategies: dict[str, StrategyResults]


def server_app(
    run: FederatedRun, prepared: Prepared, out: dict[str, StrategyResults], started: list[float]
) -> ServerApp:
    """The ServerApp: runs both strategies and leaves their results in ``out`` (and the time
    its main began in ``started``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        started.append(time.perf_counter())
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
            contenders.append((FEDAVG, TimedFedAvg(**sampling)))
        for name, strategy in contenders:
            out[name] = _compete(strategy, run, grid, prepared, train_config)

    return app


def _compete(
    strategy: FedAvg, run: FederatedRun, grid: Grid, prepared: Prepared, config: ConfigRecord
) -> StrategyResults:
    started = time.perf_counter()
    clock = RoundClock()
    result = _start(strategy, run, grid, prepared, config, clock)
    results: StrategyResults = {
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
        results["rounds"] = [asdict(r) for r in strategy.reports]
        results["server_seconds"] = {r.server_round: r.fold_seconds for r in strategy.reports}
        strategy.close()
    elif isinstance(strategy, TimedFedAvg):
        results["server_seconds"] = strategy.aggregate_seconds
    return results


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


def run_federated(run: FederatedRun, *, progress: bool = True) -> FederatedResults:
    """Run the comparison; returns the results (see :mod:`.report`)."""
    prepared = prepare(run.scenario, run.cache_dir, progress=progress)
    out: dict[str, StrategyResults] = {}
    main_started: list[float] = []
    started = time.perf_counter()
    run_in_process(server_app(run, prepared, out, main_started), make_client_app(), run.clients)
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
        "startup_seconds": (main_started[0] if main_started else started) - started,
        "strategies": out,
    }
