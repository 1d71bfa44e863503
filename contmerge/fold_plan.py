"""Which path each tensor of an arrival folds by: decided here, once, for every door.

- ``REFERENCE``: the whole tensor through the rule's ``fold(info, state, delta, base, ctx)``
  (OPCM's SVDs, rules that need per-arrival statistics, a LoRA adapter's δ, formed whole);
- ``CHUNKED``: 1 MiB chunks on the fold threads through ``Strategy.fold_into`` (δ in a scratch
  buffer; an elementwise rule without a compiled loop, a chain of several pre-processors);
- ``FUSED``: 1 MiB chunks through one compiled loop built around the rule's ``entry_fold``
  (difference, Σδ² and fold in a single pass over memory: ``kernels.fused_fold``).

The elementwise passes before a fold follow the same plan (chunked unless ``REFERENCE``).
``tests/test_fast_fold.py`` holds every registered elementwise rule's chunked and fused paths
equal to its reference, bit for bit.
"""

from __future__ import annotations

from enum import Enum

from .sources import Checkpoint
from .strategy import FoldContext, Strategy, TensorInfo


class FoldPath(Enum):
    REFERENCE = "reference"
    CHUNKED = "chunked"
    FUSED = "fused"


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
