"""Group commit: several arrivals folded in one pass over the state and committed once.

Each batch of tensors is folded by every arrival in turn: arrival j's new state is arrival j+1's
old one, in two spare buffers used in turn; the last goes to the staging. Each arrival keeps its
own ``FoldContext`` (its index, the globals as if folded alone), totals and verdict, so the
outcome is that of folding them one by one (``Merger.fold_group`` says when a group qualifies).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING

import torch

from .elementwise import ElementwiseBatch
from .errors import CheckpointError
from .fold_plan import plan
from .fold_run import (
    Accepted,
    FoldResult,
    Totals,
    folded_hashes,
    judge,
    next_manifest,
    note_integer,
)
from .sources import Checkpoint
from .stores import Staging
from .strategy import FoldContext

if TYPE_CHECKING:
    from .merger import Merger


def groupable(merger: Merger, arrivals: int) -> bool:
    """Whether ``arrivals`` folds in a row may share one pass: elementwise rules without passes
    or statistics files."""
    strategy = merger.strategy
    indices = range(merger.count + 1, merger.count + 1 + arrivals)
    return (
        strategy.elementwise
        and not strategy.needs_extras
        and not any(any(True for _ in strategy.passes(merger.context(i))) for i in indices)
    )


class GroupRun:
    """Fold ``arrivals`` (full checkpoints, layouts checked) into ``merger``'s state at once."""

    def __init__(
        self,
        merger: Merger,
        arrivals: list[Checkpoint],
        identities: list[str | None],
        recorded: list[str],
    ) -> None:
        """``recorded``: each arrival's source as the manifest records it."""
        self.merger, self.strategy = merger, merger.strategy
        self.arrivals, self.identities, self.recorded = arrivals, identities, recorded
        self.ctxs: list[FoldContext] = []
        globals_ = dict(merger.manifest.globals)
        for j in range(len(arrivals)):  # each sees the globals as if folded alone, in order
            ctx = merger.context(merger.count + 1 + j)
            ctx.globals = {**globals_, "count": ctx.index - 1}
            # an elementwise rule's end_fold reads no statistics of the fold (its threads
            # gather none), so the globals can be chained before the tensors are folded
            globals_ = self.strategy.end_fold(ctx.globals, ctx)
            self.ctxs.append(ctx)
        self.totals = [Totals() for _ in arrivals]

    def run(self) -> list[tuple[int, Accepted, list[str]]] | None:
        """(index, verdict, ignored integer tensors) per arrival, committed; None, with
        nothing changed, when one of them is a duplicate of content."""
        started = time.perf_counter()
        merger = self.merger
        staging = merger.store.begin(merger.slot_metas())
        try:
            self.fold(staging)
            earlier = folded_hashes(merger.manifest)
            accepted = []
            for arrival, identity, recorded, totals in zip(
                self.arrivals, self.identities, self.recorded, self.totals
            ):
                labels = (arrival.source, recorded)
                verdict = judge(merger, arrival, labels, identity, totals, earlier)
                if isinstance(verdict, FoldResult):
                    staging.abort()
                    return None
                earlier[verdict.stats.content_hash] = 0  # a duplicate within the group too
                accepted.append(verdict)
            manifest = merger.manifest
            seconds = (time.perf_counter() - started) / len(self.arrivals)
            for ctx, verdict in zip(self.ctxs, accepted):
                manifest = next_manifest(manifest, self.strategy, ctx, verdict, seconds)
            # one commit for the group
            manifest = dataclasses.replace(manifest, generation=merger.manifest.generation + 1)
            merger.store.commit(staging, manifest)
        except BaseException:
            staging.abort()
            raise
        return [(c.index, a, t.ignored) for c, a, t in zip(self.ctxs, accepted, self.totals)]

    def fold(self, staging: Staging) -> None:
        merger = self.merger
        base, store = merger.base_tensors, merger.store
        last = len(self.arrivals) - 1
        batches = [ElementwiseBatch(self.strategy, merger.runner, ctx) for ctx in self.ctxs]

        def run() -> None:
            names = [t.info.name for t in batches[0].tensors]
            for j, (batch, arrival) in enumerate(zip(batches, self.arrivals)):
                try:
                    folded = batch.run()
                finally:
                    for name in names:
                        arrival.release(name)
                totals = self.totals[j]
                for one in folded:
                    name = one.info.name
                    if not math.isfinite(one.sum_sq):  # one by one, fold names the reason
                        raise CheckpointError(arrival.source, "not finite", name)
                    totals.hashed[name] = (arrival.meta[name].dtype, one.info.shape, one.leaves)
                    totals.sums[name] = one.sum_sq
                    if j == last:
                        staging.write(name, one.target)
            for name in names:
                base.release(name)
                store.release(name)

        for info in merger.infos.values():
            if not info.meta.is_float:
                for arrival, totals in zip(self.arrivals, self.totals):
                    note_integer(arrival, base, info, totals)
                continue
            target = staging.target(info.name)
            spares = [{k: torch.empty_like(v) for k, v in target.items()} for _ in range(2)]
            old = store.view(info.name)
            for j, (batch, arrival, ctx) in enumerate(zip(batches, self.arrivals, self.ctxs)):
                new = target if j == last else spares[j % 2]
                dtype = arrival.meta[info.name].dtype
                path = plan(self.strategy, arrival, info, ctx)
                chunks = arrival.chunks(info.name)
                batch.add(info, dtype, chunks, base.flat(info), old, new, path)
                old = new
            if batches[0].full:
                run()
        run()
