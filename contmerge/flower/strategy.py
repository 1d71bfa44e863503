"""Any contmerge strategy as a Flower strategy (Message API, ``flwr.serverapp.strategy``).

Two ways to run it:

- **drop-in**: ``strategy.start(grid=..., initial_arrays=..., num_rounds=...)``, Flower's own
  round loop. Flower's ``send_and_receive`` gathers every reply of the round into a list before
  ``aggregate_train`` runs; the replies are then folded one by one, but they were all in memory.
- **streaming**: ``strategy.start_streaming(grid=..., ...)``, same arguments and ``Result``:
  Flower's own ``start`` again, over a :class:`~contmerge.flower.streaming.StreamingGrid` that
  pushes the train messages and hands replies to ``aggregate_train`` as they are pulled; each is
  folded and dropped at once, so server memory does not grow with the number of clients. Being
  the same round loop, both ways send the same messages and evaluate alike.

Two merge semantics (``merge=``):

- ``"round"``: each round, a fresh in-memory Merger whose base is the model broadcast that
  round; client replies are task vectors relative to it (``average`` is then unweighted FedAvg).
- ``"continual"``: one Merger for the whole run whose base is fixed (the initial model, or
  ``base=``); every reply of every round is a model of that base, folded continually (e.g.
  clients each fine-tune on their own task and OPCM folds them). With ``state_dir`` that merge
  state is durable and a restarted server resumes it.

Either way every reply is checked by the Merger before it is folded (names, shapes, dtypes,
NaN/Inf, a model of another base); a bad reply is logged with its reason and never folded, a
client error is logged, and nodes that did not answer before the timeout are logged as missing.
The round completes from what arrived if at least ``min_replies`` replies were accepted;
otherwise the previous global model is kept.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Literal

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.supercore import log

from ..errors import CheckpointError
from ..merger import Merger, Source
from ..registry import parse_strategy
from ..strategy import Strategy
from .arrays import ArrayRecordCheckpoint, to_array_record
from .metrics import RunningMetrics
from .streaming import StreamingGrid

MergeMode = Literal["round", "continual"]
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


@dataclass
class RoundReport:
    """What happened to each node of one training round."""

    server_round: int
    sampled: list[int] = field(default_factory=list)
    folded: list[int] = field(default_factory=list)
    #: valid replies identical to one already folded (the Merger's content-hash dedupe)
    duplicates: list[int] = field(default_factory=list)
    #: node -> why its reply was refused (wrong names/shapes/dtypes, NaN/Inf, another base)
    rejected: dict[int, str] = field(default_factory=dict)
    #: node -> the error its ClientApp reported
    failed: dict[int, str] = field(default_factory=dict)
    #: nodes with no reply before the timeout
    missing: list[int] = field(default_factory=list)
    #: True when the round produced a new global model
    updated: bool = False
    #: wall time of ``aggregate_train``: under ``start_streaming`` it includes the wait for the
    #: replies, under ``start`` they were all in before it began
    seconds: float = 0.0
    #: of which the server's own work: folding the replies and emitting the merge
    fold_seconds: float = 0.0

    @property
    def accepted(self) -> int:
        return len(self.folded) + len(self.duplicates)


class ContmergeStrategy(FedAvg):
    """A Flower strategy whose training aggregation is a contmerge fold.

    ``strategy`` is a contmerge strategy object or spec (``"opcm"``, ``"ties(scaling_factor=0.3)"``,
    ``"chain(dare(p=0.9), magmax())"``). Sampling, evaluation and the record keys are FedAvg's
    (same keyword arguments). Contmerge rules weigh every accepted reply equally: the
    ``weighted_by_key`` value only weights the averaged client metrics.

    Streaming knobs (:class:`~contmerge.flower.streaming.ReplyStream`): ``poll_interval``,
    ``pull_batch`` and ``max_in_flight``; set ``max_in_flight`` when folding a reply can be
    slower than clients produce them, so waiting replies cannot pile up in the SuperLink.

    Hooks for subclasses: :meth:`make_merger` (how a Merger is built), :meth:`on_reply` (each
    reply with what became of it), :meth:`on_round_end` (each :class:`RoundReport`).
    """

    def __init__(
        self,
        strategy: str | Strategy,
        *,
        merge: MergeMode = "round",
        base: Source | None = None,
        state_dir: str | Path | None = None,
        min_replies: int = 1,
        merger_options: Mapping[str, Any] | None = None,
        poll_interval: float = 0.1,
        pull_batch: int = 4,
        max_in_flight: int | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if merge not in ("round", "continual"):
            raise ValueError(f"merge must be 'round' or 'continual', not {merge!r}")
        if state_dir is not None and merge != "continual":
            raise ValueError("state_dir only makes sense with merge='continual'")
        self.rule = parse_strategy(strategy)
        self.merge: MergeMode = merge
        self.base = base
        self.state_dir = state_dir
        self.min_replies = max(1, int(min_replies))
        self.merger_options = dict(merger_options or {})
        self.poll_interval = poll_interval
        self.pull_batch = pull_batch
        self.max_in_flight = max_in_flight
        self.reports: list[RoundReport] = []
        self._merger: Merger | None = None  # the run's Merger (continual) or the round's
        self._round_base: tuple[int, ArrayRecord] | None = None
        self._sampled: dict[int, list[int]] = {}

    # --- hooks ----------------------------------------------------------------------------
    def make_merger(self, base: Source) -> Merger:
        """Build the Merger for a round (``merge="round"``) or for the run (``"continual"``)."""
        if self.merge == "continual":
            return Merger(base, self.rule, self.state_dir, **self.merger_options)
        # within a round every client's reply counts, even two identical ones (FedAvg's view)
        return Merger(base, self.rule, None, **{"dedupe": False, **self.merger_options})

    def on_reply(self, server_round: int, reply: Message, status: str) -> None:
        """Called for every reply once handled: status is folded, duplicate, rejected or failed.

        The reply is dropped right after this returns (in streaming mode); keep only what you
        need from it.
        """

    def broadcast_arrays(self, server_round: int) -> ArrayRecord | None:
        """The model sent to clients in ``server_round`` (while that round is being handled)."""
        if self._round_base is not None and self._round_base[0] == server_round:
            return self._round_base[1]
        return None

    def on_round_end(self, report: RoundReport) -> None:
        """Called after every training round; the default logs who was missing or refused."""
        log(
            INFO,
            "contmerge round %d: folded %d/%d (%d duplicate, %d rejected, %d failed, "
            "%d missing) in %.2fs",
            report.server_round,
            len(report.folded),
            len(report.sampled),
            len(report.duplicates),
            len(report.rejected),
            len(report.failed),
            len(report.missing),
            report.seconds,
        )
        if report.missing:
            log(WARNING, "round %d: no reply in time from nodes %s", report.server_round,
                report.missing)  # fmt: skip
        if not report.updated:
            log(
                WARNING,
                "round %d: only %d accepted replies (min_replies=%d): global model unchanged",
                report.server_round,
                report.accepted,
                self.min_replies,
            )

    # --- Flower Strategy API --------------------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├──> contmerge strategy: %s (merge=%s)", self.rule.spec(), self.merge)
        if self.state_dir is not None:
            log(INFO, "\t├──> merge state: %s", self.state_dir)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.merge == "continual" and self._merger is None:
            self._merger = self.make_merger(self._base_source(arrays))
            if self._merger.count:
                log(INFO, "resumed a merge state of %d folded models", self._merger.count)
                arrays = to_array_record(self._merger.iter_merged())
        self._round_base = (server_round, arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sampled[server_round] = [m.metadata.dst_node_id for m in messages]
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fold the round's replies one by one (as they are pulled, under ``start_streaming``)."""
        started = time.perf_counter()
        merger = self._round_merger(server_round)
        report = RoundReport(server_round, sampled=self._sampled.pop(server_round, []))
        metrics = RunningMetrics(self.weighted_by_key)
        for reply in replies:
            self._take(merger, reply, report, metrics)
            del reply  # folded: nothing of it stays in memory while the next one is pulled
        answered = {*report.folded, *report.duplicates, *report.rejected, *report.failed}
        report.missing = [n for n in report.sampled if n not in answered]
        arrays = None
        if report.accepted >= self.min_replies and merger.count > 0:
            emitting = time.perf_counter()
            arrays = to_array_record(merger.iter_merged())
            report.fold_seconds += time.perf_counter() - emitting
            report.updated = True
        if self.merge == "round":
            merger.close()
        report.seconds = time.perf_counter() - started
        self.reports.append(report)
        self.on_round_end(report)
        return arrays, metrics.result()

    def start_streaming(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """:meth:`start` with each reply folded as it is pulled, then dropped.

        ``timeout`` bounds each round's wait for replies; the round then completes from
        what arrived (see :class:`RoundReport`).
        """
        streaming = StreamingGrid(
            grid,
            poll_interval=self.poll_interval,
            pull_batch=self.pull_batch,
            max_in_flight=self.max_in_flight,
        )
        return self.start(
            streaming,
            initial_arrays,
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )

    # --- one round ------------------------------------------------------------------------
    def current_merger(self) -> Merger | None:
        """The continual Merger (its manifest lists every folded reply), if one exists."""
        return self._merger if self.merge == "continual" else None

    def close(self) -> None:
        if self._merger is not None:
            self._merger.close()
            self._merger = None

    def _base_source(self, broadcast: ArrayRecord) -> Source:
        if self.base is not None:
            return self.base
        return ArrayRecordCheckpoint(broadcast, "broadcast model")

    def _round_merger(self, server_round: int) -> Merger:
        """The Merger the round's replies fold into: a fresh one on the broadcast, or the run's."""
        if self._round_base is None or self._round_base[0] != server_round:
            raise RuntimeError(f"aggregate_train({server_round}) without configure_train first")
        if self.merge == "round":
            broadcast = self._round_base[1]
            return self.make_merger(ArrayRecordCheckpoint(broadcast, f"round {server_round}"))
        assert self._merger is not None
        return self._merger

    def _take(
        self, merger: Merger, reply: Message, report: RoundReport, metrics: RunningMetrics
    ) -> None:
        """Fold one reply, or log why not. Never raises for a bad reply."""
        node = reply.metadata.src_node_id
        if reply.has_error():
            report.failed[node] = str(reply.error.reason)
            log(WARNING, "round %d: node %d failed: %s", report.server_round, node,
                client_message(report.failed[node]))  # fmt: skip
            self.on_reply(report.server_round, reply, "failed")
            return
        started = time.perf_counter()
        try:
            record = self._reply_arrays(reply, node)
            arrival = ArrayRecordCheckpoint(record, f"node {node}")
            result = merger.fold(arrival, name=f"round {report.server_round} node {node}")
        except CheckpointError as exc:
            report.fold_seconds += time.perf_counter() - started
            report.rejected[node] = str(exc)
            log(WARNING, "round %d: rejected reply: %s", report.server_round, exc)
            self.on_reply(report.server_round, reply, "rejected")
            return
        report.fold_seconds += time.perf_counter() - started
        (report.folded if result.status == "folded" else report.duplicates).append(node)
        metrics.add(reply.content)
        self.on_reply(report.server_round, reply, result.status)

    def _reply_arrays(self, reply: Message, node: int) -> ArrayRecord:
        records = reply.content.array_records
        if self.arrayrecord_key in records:
            return records[self.arrayrecord_key]
        if len(records) == 1:
            return next(iter(records.values()))
        raise CheckpointError(
            f"node {node}",
            f"expected one ArrayRecord (key {self.arrayrecord_key!r}), got {sorted(records)}",
        )


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# the last line of a Python traceback: "RuntimeError: message" (also dotted, e.g. torch.x.Error)
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b.*$")
_FLOWER_WRAPPER = "ClientAppException"


def client_message(text: str, limit: int = 300) -> str:
    """The client's own error in a failed reply's reason, for one log line.

    Under Ray the reason is the repr of a RayTaskError: its first line is Ray's header (actor,
    pid, colour codes), the client's traceback comes after and ends in the line that says what
    went wrong, which Flower then wraps in a ClientAppException. That line is what a reader needs.
    """
    lines = [_ANSI.sub("", line).strip() for line in text.strip().splitlines()]
    raised = [line for line in lines if _EXCEPTION_LINE.match(line) and _FLOWER_WRAPPER not in line]
    if raised:
        line = raised[0]  # the client's exception, before Ray's and Flower's re-raises
    else:
        line = next((x for x in lines if x), "(no reason given)")
    return line if len(line) <= limit else line[:limit] + "…"
