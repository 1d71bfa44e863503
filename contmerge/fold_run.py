"""One arrival's fold, stage by stage: check → passes → fold → verdict → commit.

A ``FoldRun`` owns everything that lives for one fold: the opened arrival and its statistics
files, the ``FoldContext``, the staging of the new state, the totals gathered on the way (hash
leaves, ‖θ_t − θ0‖² per tensor, integer tensors that differ) and the progress bar. ``Merger``
keeps what outlives it (the base, the store, the strategy, the threads) and makes one per fold::

    run.check()            # layout, dtype policy: headers only   (contmerge.checks)
    run.passes()           # the rule's sweeps over the arrival    (Strategy.passes)
    run.fold(staging)      # every tensor on its planned path      (contmerge.fold_plan)
    run.verdict()          # content hash, duplicate, another base (contmerge.checks)
    run.commit(...)        # new generation + manifest, atomically (contmerge.state)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from tqdm.auto import tqdm

from .base_tensors import BaseTensors
from .checks import (
    STATE_OVERFLOW,
    ArrivalStats,
    Hashed,
    arrival_stats,
    check_layout,
    check_same_base,
    hashed,
    squared_norm,
    state_finite,
    why_not_finite,
)
from .elementwise import ElementwiseBatch, ElementwiseSweep
from .errors import CheckpointError, IgnoredTensorWarning
from .fold_plan import FoldPath, deferrable, plan, sweep_path
from .manifest import ArrivalRecord, Manifest
from .parallel_folds import ParallelFolds
from .sources import Checkpoint
from .stores import Staging
from .strategy import DeferredFold, FoldContext, Pass, State, Strategy, TensorInfo

if TYPE_CHECKING:
    from .merger import Merger

FoldStatus = Literal["folded", "duplicate"]


@dataclass(frozen=True)
class FoldResult:
    status: FoldStatus
    index: int  # position among folded arrivals (of the earlier fold, for a duplicate)
    content_hash: str
    source: str
    seconds: float
    #: what was folded but deserves a look (also issued as ``IgnoredTensorWarning``)
    warnings: tuple[str, ...] = ()


@dataclass
class Totals:
    """What one arrival's fold gathers per tensor, for its verdict."""

    hashed: dict[str, Hashed] = field(default_factory=dict)
    #: ‖θ_t − θ0‖² of each float tensor
    sums: dict[str, float] = field(default_factory=dict)
    #: integer tensors that differ from the base (not merged)
    ignored: list[str] = field(default_factory=list)


class FoldRun:
    """Fold ``arrival`` into ``merger``'s state (see the module's docstring); ``run`` does it all.
    Closes the arrival and its ``extras`` when done (use as a context manager)."""

    def __init__(
        self,
        merger: Merger,
        arrival: Checkpoint,
        extras: dict[str, Checkpoint],
        labels: tuple[str, str],
        identity: str | None,
        weight: float | None,
        started: float,
    ) -> None:
        """``labels``: the arrival as shown (typed) and as recorded (absolute)."""
        self.merger, self.strategy, self.base = merger, merger.strategy, merger.base_tensors
        self.infos, self.store, self.runner = merger.infos, merger.store, merger.runner
        self.arrival, self.extras = arrival, extras
        self.label, self.recorded = labels
        self.identity, self.weight, self.started = identity, weight, started
        self.ctx = merger.context(merger.count + 1, extras, weight)
        self.totals = Totals()

    def __enter__(self) -> FoldRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.arrival.close()
        for extra in self.extras.values():
            extra.close()

    def run(self) -> FoldResult:
        self.check()
        # a rule that can start folding before its whole-model statistics are known does so
        # where the new state stays in memory anyway until the waiting entries are settled
        self.ctx.defer = self.store.path is None and deferrable(
            self.strategy, self.arrival, (self.infos[n] for n in self.base.float_names)
        )
        self.passes()
        deferred = self.strategy.deferred_fold(self.ctx) if self.ctx.defer else None
        staging = self.store.begin(self.merger.slot_metas())
        try:
            self.fold(staging, deferred)
            if deferred is not None and not self._settle(deferred):
                # the windows missed the thresholds, or too many columns waited: the ordinary way
                staging.abort()
                self.ctx = dataclasses.replace(self.ctx, stats={}, defer=False)
                self.totals = Totals()
                self.passes()
                staging = self.store.begin(self.merger.slot_metas())
                self.fold(staging)
            verdict = self.verdict(folded_hashes(self.merger.manifest))
            if isinstance(verdict, FoldResult):  # a duplicate of content: nothing changes
                staging.abort()
                return dataclasses.replace(verdict, seconds=time.perf_counter() - self.started)
            self.commit(staging, verdict)
        except BaseException:
            staging.abort()
            raise
        return folded_result(self.ctx.index, verdict, self.totals.ignored, self.started)

    # --- stages ---------------------------------------------------------------------------
    def check(self) -> None:
        check_layout(self.arrival, self.infos, self.base.float_names)

    def passes(self) -> None:
        for sweep in self.strategy.passes(self.ctx):
            if sweep.elementwise:
                self._sweep_chunks(sweep)
            else:
                for info, delta in self._deltas("pass"):
                    sweep.update(info, delta, self.store.read(info.name), self.ctx)
            sweep.finish(self.ctx)

    def fold(self, staging: Staging, deferred: DeferredFold | None = None) -> None:
        """Fold every tensor into ``staging`` on its planned path (every one by ``deferred``
        when given: its ``settle`` comes after); totals into ``totals``."""
        batch = ElementwiseBatch(self.strategy, self.runner, self.ctx)
        # whole-tensor folds on several threads, handed on in order (None: one at a time here)
        whole = (
            ParallelFolds(self.strategy, self.ctx, self.runner.workers, self._writer(staging))
            if self.strategy.per_tensor_parallel and self.runner.workers > 1
            else None
        )
        with (
            self._bar(len(self.infos), f"fold {Path(self.label).name}") as bar,
            whole or contextlib.nullcontext(),
        ):
            for info in self.infos.values():
                if not info.meta.is_float:
                    note_integer(self.arrival, self.base, info, self.totals)
                    bar.update()
                    continue
                path = (
                    FoldPath.DEFERRED
                    if deferred is not None
                    else plan(self.strategy, self.arrival, info, self.ctx)
                )
                if path is FoldPath.REFERENCE:
                    self._fold_batch(batch, staging, bar)  # keep order
                    self._fold_whole(info, staging, whole)
                    bar.update()
                    continue
                if whole is not None:
                    whole.drain()  # keep order
                batch.add(
                    info,
                    self.arrival.meta[info.name].dtype,
                    self.arrival.chunks(info.name),
                    self.base.flat(info),
                    self.store.view(info.name),
                    staging.target(info.name),
                    path,
                    deferred,
                )
                if batch.full:
                    self._fold_batch(batch, staging, bar)
            if whole is not None:
                whole.drain()
            self._fold_batch(batch, staging, bar)

    def verdict(self, earlier: Mapping[str, int]) -> Accepted | FoldResult:
        """The folded arrival let in; a duplicate's result when its content hash is one of
        the ``earlier`` ones; CheckpointError if it moved too far."""
        labels = (self.label, self.recorded)
        return judge(
            self.merger, self.arrival, labels, self.identity, self.totals, earlier, self.weight
        )

    def commit(self, staging: Staging, accepted: Accepted) -> None:
        seconds = time.perf_counter() - self.started
        manifest = next_manifest(self.merger.manifest, self.strategy, self.ctx, accepted, seconds)
        self.store.commit(staging, manifest)

    def _settle(self, deferred: DeferredFold) -> bool:
        """Fold the entries ``deferred`` left waiting (in the staged state, still in memory);
        False if it could not settle."""
        overflowed = deferred.settle(self.ctx)
        if overflowed is None:
            return False
        if overflowed:  # δ was finite (checked in the chunks): the fold overflowed
            raise CheckpointError(self.arrival.source, STATE_OVERFLOW, overflowed[0])
        return True

    # --- per tensor -----------------------------------------------------------------------
    def _writer(self, staging: Staging) -> Any:
        def write_finite(name: str, new: State) -> None:
            if not state_finite(new):  # δ was finite: the fold overflowed
                raise CheckpointError(self.arrival.source, STATE_OVERFLOW, name)
            staging.write(name, new)

        return write_finite

    def _fold_whole(self, info: TensorInfo, staging: Staging, whole: ParallelFolds | None) -> None:
        """The rule's reference ``fold`` on the whole tensor (on the threads when ``whole``)."""
        delta, base, self.totals.sums[info.name] = self._delta(info, self.totals.hashed)
        state = self.store.read(info.name)
        if whole is None:
            new = self.strategy.fold(info, state, delta, base, self.ctx)
            self._writer(staging)(info.name, new)
        else:
            whole.submit(info, state, delta, base)

    def _fold_batch(self, batch: ElementwiseBatch, staging: Staging, bar: Any) -> None:
        """Fold the tensors gathered in ``batch`` and hand their new state to ``staging``."""
        if not batch.tensors:
            return
        names = [t.info.name for t in batch.tensors]
        try:
            folded = batch.run()
        finally:
            for name in names:
                self._release(name)
        for one in folded:
            name = one.info.name
            if not math.isfinite(one.sum_sq):
                why = why_not_finite(self.arrival, self.base.checkpoint, one.info, one.target)
                raise CheckpointError(self.arrival.source, why, name)
            self.totals.hashed[name] = (self.arrival.meta[name].dtype, one.info.shape, one.leaves)
            self.totals.sums[name] = one.sum_sq
            staging.write(name, one.target)
        bar.update(len(folded))

    def _sweep_chunks(self, sweep: Pass) -> None:
        """An elementwise pass: chunked on the fold threads where the fold would be chunked."""
        batch = ElementwiseSweep(sweep, self.runner, self.ctx)

        def run() -> None:
            for name in batch.run():
                self._release(name)

        for name in self.base.float_names:
            info = self.infos[name]
            if sweep_path(self.strategy, self.arrival, info) is FoldPath.REFERENCE:
                delta, _, _ = self._delta(info, None)  # e.g. an adapter's δ, computed whole
                sweep.update(info, delta, self.store.read(name), self.ctx)
                continue
            batch.add(
                info,
                self.arrival.meta[name].dtype,
                self.arrival.chunks(name),
                self.base.flat(info),
                self.store.view(name),
            )
            if batch.full:
                run()
        run()

    def _release(self, name: str) -> None:
        self.arrival.release(name)
        self.base.release(name)
        self.store.release(name)

    def _delta(
        self, info: TensorInfo, into: dict[str, Hashed] | None
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(θ_t − θ0, θ0, ‖θ_t − θ0‖²) of one float tensor, in compute dtype, checked finite;
        the arrival's own tensor (or a LoRA adapter's delta) is hashed ``into``."""
        arrival, name = self.arrival, info.name
        # a LoRA adapter's tensors are factors or replacements: ask it for the delta
        full = arrival.carries_full_weights and name in arrival.meta
        base = self.base.read(info)
        if full:
            value = arrival.read(name)
            if into is not None:
                into[name] = hashed(value)
            delta = value.to(info.compute_dtype)
            if delta is value and not arrival.fresh_reads:
                delta = delta - base  # the caller's own tensor: never write into it
            else:
                delta.sub_(base)
        else:
            lowrank = arrival.delta(name, base)
            delta = torch.zeros_like(base) if lowrank is None else lowrank
            if into is not None:
                into[name] = hashed(delta)
        sq = squared_norm(delta)
        if not math.isfinite(sq):
            why = why_not_finite(arrival, self.base.checkpoint, info)
            raise CheckpointError(arrival.source, why, name)
        return delta, base, sq

    def _deltas(self, label: str) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
        """(info, θ_t − θ0) per float tensor, for a strategy's passes."""
        with self._bar(len(self.base.float_names), label) as bar:
            for name in self.base.float_names:
                info = self.infos[name]
                yield info, self._delta(info, None)[0]
                bar.update()

    def _bar(self, total: int, desc: str) -> Any:
        return tqdm(
            total=total, desc=desc, unit="tensor", disable=not self.merger.progress, leave=False
        )


# --- shared with group commit (contmerge.fold_group) ---------------------------------------
def note_integer(arrival: Checkpoint, base: BaseTensors, info: TensorInfo, totals: Totals) -> None:
    """An integer tensor is not merged, but is part of the arrival's content; noted when it
    differs from the base."""
    if arrival.carries_full_weights and info.name in arrival.meta:
        value = arrival.read(info.name)
        totals.hashed[info.name] = hashed(value)
        if not torch.equal(value, base.checkpoint.view(info.name)):
            totals.ignored.append(info.name)
        base.release(info.name)


@dataclass(frozen=True)
class Accepted:
    """An arrival its verdict lets in: what its manifest record is made of."""

    stats: ArrivalStats
    label: str  # as shown
    source: str  # as recorded: a file's absolute path, else the label
    identity: str | None
    weight: float | None

    def record(self, index: int, seconds: float) -> ArrivalRecord:
        stats = self.stats
        return ArrivalRecord(
            index=index,
            hash=stats.content_hash,
            source=self.source,
            relative_delta=round(stats.relative_delta, 6),
            folded_at=now(),
            file=self.identity,
            median_matrix_delta=round(stats.median_matrix_delta, 6),
            dtype=stats.dtype,
            weight=None if self.weight is None else float(self.weight),
            seconds=round(seconds, 4),
        )


def folded_hashes(manifest: Manifest) -> dict[str, int]:
    """The content hashes of the folded arrivals, each with the index it was first folded at."""
    hashes: dict[str, int] = {}
    for record in manifest.arrivals:
        hashes.setdefault(record.hash, record.index)
    return hashes


def judge(
    merger: Merger,
    arrival: Checkpoint,
    labels: tuple[str, str],
    identity: str | None,
    totals: Totals,
    earlier: Mapping[str, int],
    weight: float | None = None,
) -> Accepted | FoldResult:
    """The verdict on a folded arrival (``labels``: as shown, as recorded): let in; a
    duplicate's result when its content hash is one of the ``earlier`` ones (with their
    index); CheckpointError if it moved too far."""
    label, recorded = labels
    stats = arrival_stats(arrival, merger.infos, totals.hashed, totals.sums, merger.base_sq)
    if merger.dedupe and stats.content_hash in earlier:
        index = earlier[stats.content_hash]
        return FoldResult("duplicate", index, stats.content_hash, label, 0.0)
    check_same_base(stats, arrival, label, merger.max_relative_delta)
    return Accepted(stats, label, recorded, identity, weight)


def next_manifest(
    manifest: Manifest,
    strategy: Strategy,
    ctx: FoldContext,
    accepted: Accepted,
    seconds: float,
) -> Manifest:
    """``manifest`` with ``accepted`` folded after it."""
    new_globals = strategy.end_fold(ctx.globals, ctx)
    return manifest.folded(accepted.record(ctx.index, seconds), new_globals)


def folded_result(index: int, accepted: Accepted, ignored: list[str], started: float) -> FoldResult:
    label = accepted.label
    notes = tuple(
        f"{label}: tensor {name!r} differs from the base but is not merged (integer "
        "tensors are not merged; the base's value is emitted)"
        for name in ignored
    )
    for note in notes:
        warnings.warn(note, IgnoredTensorWarning, stacklevel=4)
    seconds = time.perf_counter() - started
    return FoldResult("folded", index, accepted.stats.content_hash, label, seconds, notes)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
