"""Which path each tensor of an arrival folds by: decided here, once, for every door.

- ``REFERENCE``: the whole tensor through the rule's ``fold(info, state, delta, base, ctx)``
  (OPCM's SVDs, rules that need per-arrival statistics, a LoRA adapter's δ, formed whole);
- ``CHUNKED``: 1 MiB chunks on the fold threads through ``Strategy.fold_into`` (δ in a scratch
  buffer; an elementwise rule without a compiled loop, a chain of several pre-processors);
- ``FUSED``: 1 MiB chunks through one compiled loop built around the rule's ``entry_fold``
  (difference, Σδ² and fold in a single pass over memory: ``kernels.fused_fold``).
- ``DEFERRED``: 1 MiB chunks through the rule's ``deferred_fold`` (TIES: every entry its
  thresholds cannot change folds in that one pass, the others when the last chunk is done);
  chosen by ``FoldRun`` for a whole arrival, where every tensor would be chunked and the
  state is in memory (``deferrable``).

The elementwise passes before a fold follow the same plan (chunked unless ``REFERENCE``).
``tests/test_fast_fold.py`` holds every registered elementwise rule's chunked and fused paths
equal to its reference, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from .sources import Checkpoint
from .strategy import FoldContext, Strategy, TensorInfo


class FoldPath(Enum):
    REFERENCE = "reference"
    CHUNKED = "chunked"
    FUSED = "fused"
    DEFERRED = "deferred"


def plan(strategy: Strategy, arrival: Checkpoint, info: TensorInfo, ctx: FoldContext) -> FoldPath:
    """The path of one float tensor of ``arrival`` in its fold; ``ctx`` is the arrival's, after
    its passes (a rule's entry loop may depend on its index, weight and what the passes left)."""
    if sweep_path(strategy, arrival, info) is FoldPath.REFERENCE:
        return FoldPath.REFERENCE
    return FoldPath.CHUNKED if strategy.entry_fold(info, ctx) is None else FoldPath.FUSED


def sweep_path(strategy: Strategy, arrival: Checkpoint, info: TensorInfo) -> FoldPath:
    """The path of one float tensor in an elementwise pass before the fold: chunked wherever
    the fold will be (a pass has no compiled entry loop), else whole."""
    chunkable = (
        strategy.elementwise
        and not strategy.needs_extras
        # the chunks read the arrival's own bytes: a LoRA adapter's are factors, its δ is formed
        and arrival.carries_full_weights
        and info.name in arrival.meta
    )
    return FoldPath.CHUNKED if chunkable else FoldPath.REFERENCE


def deferrable(strategy: Strategy, arrival: Checkpoint, infos: Iterable[TensorInfo]) -> bool:
    """Whether this arrival may fold by the rule's ``deferred_fold``: every float tensor in
    ``infos`` is chunked (the waiting entries are settled in the chunks' own buffers)."""
    return strategy.defers and all(
        sweep_path(strategy, arrival, info) is FoldPath.CHUNKED for info in infos
    )
