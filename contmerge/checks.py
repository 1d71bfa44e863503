"""What an arrival must pass to be folded, and what is measured of it on the way.

Before anything is read (``check_weight``, ``check_layout``, ``check_full_weights``): the
per-arrival weight, and names, shapes and dtypes against the base's layout, from headers only
(the Merger's arrivals, FW-Merging's pool, DIMAT's neighbours against the anchor). While it
folds: every δ and every new state finite (``why_not_finite`` says which of the two went
wrong). After its tensors went past: ``ArrivalStats`` (content hash, distance from the base)
and ``check_same_base``, which refuses a model fine-tuned from another base. Refusals are
``CheckpointError``s naming file, tensor and reason; the state is untouched.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .dtypes import arrival_dtype_problem, dtype_summary
from .errors import CheckpointError, SettingError
from .hashing import ContentHash, tensor_leaves
from .kernels import all_finite, sum_sq
from .sources import Checkpoint, Recognised
from .strategy import State, Strategy, TensorInfo

#: what the content hash takes of one tensor: dtype, shape and its leaves' digests
Hashed = tuple[torch.dtype, tuple[int, ...], list[bytes]]
#: why a fold from finite inputs is refused when the new state it computes is not finite
STATE_OVERFLOW = (
    "folding it would make the merged state Inf or NaN (it overflows the float range); "
    "refused, the state is unchanged"
)


@dataclass(frozen=True)
class ArrivalStats:
    """What one arrival's fold measured of it, for the verdict and its manifest record."""

    content_hash: str
    #: ‖θ_t − θ0‖ / ‖θ0‖ over every float tensor
    relative_delta: float
    #: median over the weight matrices the arrival changes of ‖δ‖ / ‖θ0‖ (another-base check)
    median_matrix_delta: float
    #: the arrival's dtypes as ``dtypes.dtype_summary`` writes them
    dtype: str


def check_weight(strategy: Strategy, weight: float | None) -> None:
    if weight is None:
        return
    if not strategy.takes_weight:
        raise SettingError(
            f"{strategy.spec()} takes no per-arrival weight (average and "
            "task_arithmetic do); fold without one"
        )
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
        raise SettingError(f"weight {weight!r} must be a finite number > 0")


def check_full_weights(arrival: Checkpoint | Recognised, rule: str) -> None:
    """For the rules that read whole models (DIMAT, FW-Merging): an adapter is refused."""
    if isinstance(arrival, Recognised):
        full, source = arrival.full_weights, str(arrival.path)
    else:
        full, source = arrival.carries_full_weights, arrival.source
    if not full:
        raise CheckpointError(
            source,
            f"{rule} reads whole models' weights and a LoRA adapter carries only a change: "
            "merge the adapter into its base first",
        )


def check_layout(
    arrival: Checkpoint, infos: Mapping[str, TensorInfo], float_names: Sequence[str]
) -> None:
    """Names, shapes and dtypes against the base, from headers only (no tensor data): the one
    rule of the Merger's folds, FW-Merging's pool and DIMAT's neighbours."""
    if arrival.carries_full_weights:
        # integer buffers are not merged (the base's are emitted), and transformers no
        # longer saves non-persistent ones such as BERT's ``position_ids``: only floats count
        missing = [n for n in float_names if n not in arrival.meta]
        if missing:
            raise CheckpointError(
                arrival.source, f"{len(missing)} tensor(s) of the base are missing", missing[0]
            )
    extra = [n for n in arrival.meta if n not in infos]
    if extra:
        raise CheckpointError(
            arrival.source, f"{len(extra)} tensor(s) the base does not have", extra[0]
        )
    for name, meta in arrival.meta.items():
        want = infos[name].meta
        if meta.shape != want.shape:
            raise CheckpointError(
                arrival.source,
                f"shape {list(meta.shape)}, the base has {list(want.shape)}",
                name,
            )
        problem = arrival_dtype_problem(meta.dtype, want.dtype, infos[name].compute_dtype)
        if problem:
            raise CheckpointError(arrival.source, problem, name)


def arrival_stats(
    arrival: Checkpoint,
    infos: Mapping[str, TensorInfo],
    hashed: Mapping[str, Hashed],
    sums: Mapping[str, float],
    base_sq: Mapping[str, float],
) -> ArrivalStats:
    """The content hash (in the base's order) and distances from the base of a folded arrival;
    ``sums`` holds ‖θ_t − θ0‖² by tensor, ``base_sq`` ‖θ0‖²."""
    content = ContentHash()
    for name in infos:
        if name in hashed:
            content.add(name, *hashed[name])
    # over the matrices the arrival changes: all of a full model's, an adapter's targets
    matrix_ratios = [
        math.sqrt(sums[n] / base_sq[n])
        for n in sums
        if n in arrival.meta and len(infos[n].shape) >= 2 and base_sq[n] > 0
    ]
    total_base_sq = sum(base_sq.values())
    delta_sq = math.fsum(sums.values())
    return ArrivalStats(
        content_hash=content.hexdigest(),
        relative_delta=math.sqrt(delta_sq / total_base_sq) if total_base_sq > 0 else 0.0,
        median_matrix_delta=statistics.median(matrix_ratios) if matrix_ratios else 0.0,
        dtype=dtype_summary(arrival.meta.values()),
    )


def check_same_base(
    stats: ArrivalStats, arrival: Checkpoint, label: str, limit: float | None
) -> None:
    """CheckpointError when the arrival moved further from the base than ``limit`` allows."""
    moved = stats.median_matrix_delta
    if limit is None or moved <= limit:
        return
    raise CheckpointError(
        label,
        f"differs from the base by {moved:.2f}× the norm of its weight matrices "
        f"(median over the matrices it changes; limit {limit}): it looks fine-tuned "
        "from another base"
        + ("" if arrival.carries_full_weights else ", or scaled absurdly (lora_alpha)")
        + " (if it is a fine-tune of this one, allow it with --any-base or a larger "
        "--max-relative-delta; in Python max_relative_delta=None)",
    )


def why_not_finite(
    arrival: Checkpoint,
    base: Checkpoint,
    info: TensorInfo,
    new_state: State | None = None,
) -> str:
    """Why a sum over δ (and the new state, when given) came out NaN or Inf."""
    name = info.name
    if not arrival.carries_full_weights or name not in arrival.meta:
        return "adapter delta has NaN or Inf"
    # δ was computed in place: read the tensor again to tell a bad value from an overflow
    compute = info.compute_dtype
    value = arrival.read(name).to(compute)
    if not bool(value.isfinite().all()):  # checked in compute dtype: f8 has no isfinite
        return "contains NaN or Inf"
    delta = value - base.read(name).to(compute)
    if bool(delta.isfinite().all()) and new_state is not None and not state_finite(new_state):
        return STATE_OVERFLOW
    return "differs from the base by more than the float range (δ overflows)"


def squared_norm(tensor: torch.Tensor) -> float:
    """Σx² accumulated in float64 (compiled, one pass); NaN/Inf if any entry is."""
    if tensor.numel() == 0:
        return 0.0
    flat = tensor.reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.to(torch.float32)
    return float(sum_sq(flat.numpy()))


def state_finite(state: State) -> bool:
    """Whether every float entry of every tensor is finite (one compiled pass each)."""
    for tensor in state.values():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        if tensor.dtype in (torch.float32, torch.float64):
            if not all_finite(tensor.reshape(-1).numpy()):
                return False
        elif not bool(tensor.float().isfinite().all()):  # half and f8 kinds: numpy has none
            return False
    return True


def hashed(tensor: torch.Tensor) -> Hashed:
    """What the content hash takes of a tensor held whole in memory."""
    return tensor.dtype, tuple(tensor.shape), tensor_leaves(tensor)
