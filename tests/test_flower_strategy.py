"""ContmergeStrategy on Flower's real simulation engine (Ray backend, one CPU per client).

One simulation with 7 virtual clients runs every scenario in turn (the engine takes ~20 s to
start); the tests then check what each scenario produced. Clients are deterministic: the model
a node returns depends only on its partition id, the round and what it received.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import json
import logging
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from contmerge.flower import ContmergeStrategy, RoundReport, from_array_record, to_array_record
from contmerge.flower.simulate import backend_config

NODES = 7
HANG = 40.0  # seconds the hanging client sleeps: far longer than the faulty round's timeout
FAULTY_TIMEOUT = 20.0
BASE = {
    "fc1.weight": torch.randn(16, 8, generator=torch.Generator().manual_seed(0)),
    "fc1.bias": torch.zeros(16),
    "fc2.weight": torch.randn(4, 16, generator=torch.Generator().manual_seed(1)),
}


def client_model(received: dict[str, torch.Tensor], pid: int, server_round: int) -> dict:
    g = torch.Generator().manual_seed(1000 * pid + server_round)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in received.items()}


def _train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    config = msg.content["config"]
    server_round = int(config["server-round"])
    received = from_array_record(msg.content["arrays"])
    model = client_model(received, pid, server_round)
    if config.get("mode") == "faulty":
        if pid == 2:
            model["fc1.weight"][3, 3] = float("nan")
        elif pid == 3:
            model["fc2.weight"] = torch.zeros(4, 17)
        elif pid == 4:  # fine-tuned from some other base
            model = {k: 10 * torch.randn(v.shape) for k, v in model.items()}
        elif pid == 5:
            raise RuntimeError("client 5 crashed")
        elif pid == 6:
            time.sleep(float(config.get("hang", 0.0)))
    metrics = MetricRecord({"num-examples": 10, "pid": pid})
    return Message(RecordDict({"arrays": to_array_record(model), "metrics": metrics}), reply_to=msg)


def _query(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"who": MetricRecord({"pid": pid})}), reply_to=msg)


def _evaluate(msg: Message, context: Context) -> Message:
    """A score of the model received and of who scored it (plus the config it was sent)."""
    pid = int(context.node_config["partition-id"])
    received = from_array_record(msg.content["arrays"])
    score = float(received["fc1.weight"].double().sum()) + pid
    probe = float(msg.content["config"].get("probe", 0.0))  # type: ignore[arg-type]
    metrics = MetricRecord({"num-examples": 10, "score": score, "probe": probe})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _client_app() -> ClientApp:
    app = ClientApp()
    app.train()(_train)
    app.query()(_query)
    app.evaluate()(_evaluate)
    return app


class Recording(ContmergeStrategy):
    """Notes, in order, every call Flower's round loop makes into the strategy and what it hands
    over: the model and configs sent, the replies folded, the evaluations."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[Any, ...]] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        sent = sorted((m.metadata.dst_node_id, dict(m.content["config"])) for m in messages)
        self.calls.append(("configure_train", server_round, from_array_record(arrays), sent))
        return messages

    def on_reply(self, server_round: int, reply: Message, status: str) -> None:
        self.calls.append(("reply", server_round, reply.metadata.src_node_id, status))

    def on_round_end(self, report: RoundReport) -> None:
        # a failed client's reason is Ray's text (pids, colours): who failed is what must agree;
        # a rejection's, with its figures masked (client 4's other base is unseeded noise)
        rejected = sorted(
            (n, re.sub(r"\d+(\.\d+)?", "#", why)) for n, why in report.rejected.items()
        )
        self.calls.append(("round_end", report.server_round, sorted(report.folded), rejected,
                           sorted(report.failed),
                           sorted(report.missing), report.updated))  # fmt: skip
        super().on_round_end(report)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        nodes = sorted(m.metadata.dst_node_id for m in messages)
        self.calls.append(("configure_evaluate", server_round, from_array_record(arrays), nodes,
                           dict(config)))  # fmt: skip
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Any:
        replies = list(replies)
        nodes = sorted(r.metadata.src_node_id for r in replies)
        self.calls.append(("aggregate_evaluate", server_round, nodes))
        return super().aggregate_evaluate(server_round, replies)

    def evaluate_fn(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = from_array_record(arrays)
        self.calls.append(("evaluate_fn", server_round, model))
        return MetricRecord({"norm": sum(float(v.double().square().sum()) for v in model.values())})


def _both_ways(
    grid: Grid, initial: ArrayRecord, rounds: int, mode: str = "good", **kwargs: Any
) -> dict[str, Any]:
    """The same strategy, inputs and clients through Flower's ``start`` and ``start_streaming``
    (``mode="faulty"``: bad replies and a crashing client, none hanging)."""
    runs = {}
    for way in ("start", "start_streaming"):
        strategy = Recording("average", **kwargs)
        result = getattr(strategy, way)(
            grid,
            initial,
            num_rounds=rounds,
            timeout=300,
            train_config=ConfigRecord({"mode": mode, "hang": 0.0}),
            evaluate_config=ConfigRecord({"probe": 2.5}),
            evaluate_fn=strategy.evaluate_fn,
        )
        runs[way] = (result, strategy.calls, strategy.reports)
    return runs


def _scenarios(grid: Grid, out: dict[str, Any], state_dir: Path) -> None:
    while len(list(grid.get_node_ids())) < NODES:
        time.sleep(0.5)
    calls = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
             for n in grid.get_node_ids()]  # fmt: skip
    replies = grid.send_and_receive(calls, timeout=300)
    out["pid"] = {r.metadata.src_node_id: int(r.content["who"]["pid"]) for r in replies}
    initial = to_array_record(BASE)
    sampling = {"fraction_evaluate": 0.0, "min_train_nodes": NODES, "min_available_nodes": NODES}
    good = ConfigRecord({"mode": "good"})

    s = ContmergeStrategy("average", **sampling)
    out["average"] = (s.start_streaming(grid, initial, num_rounds=2, timeout=300,
                                        train_config=good), s.reports)  # fmt: skip
    w = ContmergeStrategy("average", max_in_flight=2, pull_batch=1, **sampling)
    out["windowed"] = (w.start_streaming(grid, initial, num_rounds=2, timeout=300,
                                         train_config=good), w.reports)  # fmt: skip
    f = FedAvg(**sampling)
    out["fedavg"] = f.start(grid, initial, num_rounds=2, timeout=300, train_config=good)

    c = ContmergeStrategy("opcm", merge="continual", state_dir=state_dir, **sampling)
    out["continual"] = (c.start(grid, initial, num_rounds=2, timeout=300, train_config=good),
                        c.reports, c.current_merger().count)  # fmt: skip
    c.close()

    # No hanging client here; 3 good replies but 4 required: the round must not count.
    strict = ContmergeStrategy("average", min_replies=4, **sampling)
    out["strict"] = (strict.start(grid, initial, num_rounds=1, timeout=300,
                                  train_config=ConfigRecord({"mode": "faulty", "hang": 0.0})),
                     strict.reports)  # fmt: skip

    # start and start_streaming, side by side: with clients evaluating too, and with no round
    # updating the model (one reply more required than there are nodes) and no client evaluation
    everyone = {**sampling, "fraction_evaluate": 1.0, "min_evaluate_nodes": NODES}
    out["both ways"] = _both_ways(grid, initial, rounds=2, **everyone)
    out["both ways, unchanged"] = _both_ways(grid, initial, rounds=1, min_replies=NODES + 1,
                                             **sampling)  # fmt: skip
    # failures both ways: 3 replies rejected, 1 client crashed, and exactly min_replies accepted
    out["both ways, faulty"] = _both_ways(grid, initial, rounds=2, mode="faulty", min_replies=3,
                                          **everyone)  # fmt: skip

    # Last, as the hanging client keeps one simulated CPU busy after its round timed out.
    faulty = ContmergeStrategy("average", **sampling)
    started = time.monotonic()
    result = faulty.start_streaming(
        grid,
        initial,
        num_rounds=1,
        timeout=FAULTY_TIMEOUT,
        train_config=ConfigRecord({"mode": "faulty", "hang": HANG}),
    )
    out["faulty"] = (result, faulty.reports, time.monotonic() - started)  # fmt: skip


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out: dict[str, Any] = {}
    state_dir = tmp_path_factory.mktemp("flower") / "continual-state"
    server = ServerApp()
    server.main()(lambda grid, context: _scenarios(grid, out, state_dir))
    lines = _LogLines()
    flower_log = logging.getLogger("flwr")
    flower_log.addHandler(lines)
    try:
        run_simulation(
            server, _client_app(), num_supernodes=NODES, backend_config=backend_config(2)
        )
    finally:
        flower_log.removeHandler(lines)
    out["state_dir"] = state_dir
    out["log"] = lines.messages
    return out


class _LogLines(logging.Handler):
    """What the strategy logged through Flower's logger, as formatted messages."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _expected_average(pids: list[int], rounds: int) -> dict[str, torch.Tensor]:
    model = dict(BASE)
    for r in range(1, rounds + 1):
        models = [client_model(model, p, r) for p in pids]
        model = {k: sum(m[k] for m in models) / len(models) for k in model}
    return model


@pytest.mark.slow
def test_streaming_average_equals_flowers_fedavg(sim: dict[str, Any]) -> None:
    result, reports = sim["average"]
    ours = from_array_record(result.arrays)
    theirs = from_array_record(sim["fedavg"].arrays)
    expected = _expected_average(list(range(NODES)), rounds=2)
    for name in BASE:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=0)
        torch.testing.assert_close(ours[name], expected[name], atol=1e-6, rtol=0)
    assert [len(r.folded) for r in reports] == [NODES, NODES]
    assert all(r.updated and not r.missing for r in reports)
    assert result.train_metrics_clientapp[1]["pid"] == pytest.approx(sum(range(NODES)) / NODES)


@pytest.mark.slow
def test_a_bounded_window_of_messages_in_flight_gives_the_same_model(sim: dict[str, Any]) -> None:
    result, reports = sim["windowed"]
    same = from_array_record(sim["average"][0].arrays)
    windowed = from_array_record(result.arrays)
    for name in BASE:
        torch.testing.assert_close(windowed[name], same[name], atol=1e-6, rtol=0)
    assert [sorted(r.folded) for r in reports] == [sorted(sim["pid"])] * 2


@pytest.mark.slow
def test_continual_merge_folds_every_reply_of_every_round_into_one_durable_state(
    sim: dict[str, Any],
) -> None:
    result, reports, count = sim["continual"]
    assert count == 2 * NODES
    manifest = json.loads((sim["state_dir"] / "manifest.json").read_text())
    assert manifest["strategy"].startswith("opcm")
    assert [a["source"].split(" node ")[0] for a in manifest["arrivals"]] == (
        ["round 1"] * NODES + ["round 2"] * NODES
    )
    assert all(r.updated for r in reports)
    final = from_array_record(result.arrays)
    assert not torch.equal(final["fc1.weight"], BASE["fc1.weight"])


@pytest.mark.slow
def test_bad_replies_are_rejected_with_reasons_and_the_round_completes(sim: dict[str, Any]) -> None:
    result, reports, seconds = sim["faulty"]
    pid = sim["pid"]
    (report,) = reports
    by_pid = {name: sorted(pid[n] for n in getattr(report, name))
              for name in ("folded", "rejected", "failed", "missing")}  # fmt: skip
    assert by_pid == {"folded": [0, 1], "rejected": [2, 3, 4], "failed": [5], "missing": [6]}
    reasons = {pid[n]: reason for n, reason in report.rejected.items()}
    assert "NaN" in reasons[2] and "fc1.weight" in reasons[2]
    assert "shape" in reasons[3] and "fc2.weight" in reasons[3]
    assert "another base" in reasons[4]
    assert "client 5 crashed" in next(iter(report.failed.values()))
    # the log line names the client's own error, not only Ray's exception header
    failed_lines = [m for m in sim["log"] if m.startswith("round 1: node") and " failed: " in m]
    assert failed_lines  # the faulty and the strict scenario each had client 5 crash
    for line in failed_lines:
        assert line.endswith("failed: RuntimeError: client 5 crashed"), line
    assert report.updated
    # the round waited for the timeout, not for the hanging client
    assert FAULTY_TIMEOUT <= seconds < HANG
    merged = from_array_record(result.arrays)
    expected = _expected_average([0, 1], rounds=1)
    for name in BASE:
        torch.testing.assert_close(merged[name], expected[name], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_too_few_accepted_replies_keep_the_previous_model(sim: dict[str, Any]) -> None:
    result, (report,) = sim["strict"]
    assert sorted(sim["pid"][n] for n in report.folded) == [0, 1, 6]
    assert not report.updated
    assert len(result.arrays) == 0  # Flower's start keeps no new global model


def _in_order(calls: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The calls with each round's replies as one sorted entry: they come in arrival order."""
    merged: list[tuple[Any, ...]] = []
    for call in calls:
        if call[0] == "reply" and merged and merged[-1][0] == "replies":
            merged[-1] = ("replies", call[1], sorted([*merged[-1][2], call[2:]]))
        elif call[0] == "reply":
            merged.append(("replies", call[1], [call[2:]]))
        else:
            merged.append(call)
    return merged


def _assert_same(ours: Any, theirs: Any, where: str) -> None:
    """Equal, models to float rounding: replies are averaged in their (varying) arrival order."""
    if isinstance(ours, torch.Tensor):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0, msg=where)
    elif isinstance(ours, dict):
        assert ours.keys() == theirs.keys(), f"{where}: {sorted(ours)} != {sorted(theirs)}"
        for key in ours:
            _assert_same(ours[key], theirs[key], f"{where}[{key!r}]")
    elif isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs), f"{where}: {ours} != {theirs}"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _assert_same(a, b, f"{where}[{i}]")
    elif isinstance(ours, float):
        assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-6), where
    else:
        assert ours == theirs, f"{where}: {ours!r} != {theirs!r}"


def _metrics(by_round: dict[int, MetricRecord]) -> dict[int, dict[str, Any]]:
    return {r: dict(m) for r, m in by_round.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["both ways", "both ways, unchanged", "both ways, faulty"])
def test_start_streaming_keeps_flowers_round_semantics(sim: dict[str, Any], case: str) -> None:
    """``start_streaming`` against Flower's own ``Strategy.start`` on the same inputs: the same
    rounds, the same models and configs sent, the same replies folded, the same evaluations in
    the same order, the same Result; the same replies rejected (with the same reasons), the
    same clients failed, the same rounds kept or moved by ``min_replies``."""
    (flower, flower_calls, flower_reports), (ours, our_calls, our_reports) = (
        sim[case]["start"],
        sim[case]["start_streaming"],
    )
    expected, got = _in_order(flower_calls), _in_order(our_calls)
    assert [c[:2] for c in got] == [c[:2] for c in expected]  # hooks, order and rounds
    _assert_same(got, expected, case)
    assert len(ours.arrays) == len(flower.arrays)
    if len(flower.arrays):
        _assert_same(from_array_record(ours.arrays), from_array_record(flower.arrays), "arrays")
    for field in ("train_metrics_clientapp", "evaluate_metrics_clientapp",
                  "evaluate_metrics_serverapp"):  # fmt: skip
        _assert_same(_metrics(getattr(ours, field)), _metrics(getattr(flower, field)), field)
    assert [r.server_round for r in our_reports] == [r.server_round for r in flower_reports]
    assert all(0 < r.fold_seconds <= r.seconds for r in [*our_reports, *flower_reports])
    if case == "both ways":  # what the comparison covers: clients evaluated, models moved
        assert sorted(flower.evaluate_metrics_clientapp) == [1, 2]
        assert flower.evaluate_metrics_clientapp[2]["probe"] == pytest.approx(2.5)
        assert [c[0] for c in expected].count("evaluate_fn") == 3
        assert all(r.updated for r in flower_reports)
    elif case == "both ways, faulty":  # what this one covers: every kind of failure, each round
        pid = sim["pid"]
        for report in flower_reports:
            assert sorted(pid[n] for n in report.folded) == [0, 1, 6]
            assert sorted(pid[n] for n in report.rejected) == [2, 3, 4]
            assert [pid[n] for n in report.failed] == [5]
            assert report.updated and not report.missing
    else:
        assert not any(r.updated for r in flower_reports)
        assert len(flower.arrays) == 0  # Flower's start keeps no global model it did not make
