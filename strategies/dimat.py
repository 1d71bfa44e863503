"""DIMAT (Saadati et al., CVPR 2024): decentralized merging by activation matching.

Not a data-free one-pass fold, so this module has its own API instead of the ``Strategy``
protocol:

- Topologies: :func:`make_topology` (``fc``, ``ring``, ``bipartite``, ``disconnected``, with the
  exact π rows of the authors' ``genconnectivity.py``) or :func:`topology_from_matrix` for any
  row-stochastic matrix.
- Models are described by a :class:`PermutationSpec`: for each alignment point, the module whose
  *input* is the activation to correlate (like the reference's PREFIX nodes) and every
  ``(state-dict key, axis)`` that the point's permutation reorders. :func:`sequential_spec`
  builds it for plain ``nn.Sequential`` MLPs/CNNs; residual models write theirs by hand
  (``contmerge.simulations.cnn.resnet_spec``).
- :class:`DimatFold` is the merge for one agent as an exact pairwise fold: anchor vs one
  neighbour at a time, so memory is about three models (anchor, accumulator, one neighbour)
  whatever the number of neighbours. :func:`dimat_merge` wraps it; :func:`weighted_average`
  is the WA baseline (plain π-average).

Differences from the reference code: float32 without autocast; exact permutations (the
reference scales each by K/(K+1e-5) ≈ 1 − 2e-6); a negative variance from rounding is clamped to
0 before the square root. BatchNorm ``momentum`` is a module attribute, not part of the merged
state dict: the reference leaves it at None after its reset (cumulative averaging in the next
training round, counted on from the reset's batches); :func:`cumulative_bn` does the same for a
module that trains on a merged state (the decentralized scenario's default).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.optimize
import torch
from torch import nn

from contmerge.checks import check_full_weights, check_layout
from contmerge.layout import tensor_infos
from contmerge.sources import StateDictCheckpoint, open_checkpoint, recognise
from contmerge.strategy import TensorInfo

StateDict = dict[str, torch.Tensor]
#: a model's weights: a state dict, a file (.safetensors or torch), or a loader called once
Source = Mapping[str, torch.Tensor] | str | Path | Callable[[], Mapping[str, torch.Tensor]]
ModelFactory = Callable[[], nn.Module]
#: alignment point name -> perm; anchor unit k is matched with neighbour unit perm[k]
Permutations = dict[str, torch.Tensor]

CORR_EPS = 1e-7  # clamp of σσᵀ in the correlation, as the reference
TOPOLOGIES = ("fc", "ring", "bipartite", "disconnected")


# ------------------------------------------------------------------------------------------
# Topologies


@dataclass(frozen=True)
class Topology:
    """N agents and a row-stochastic mixing matrix π (π[i, j]: weight of agent j for agent i)."""

    name: str
    pi: np.ndarray

    @property
    def n(self) -> int:
        return int(self.pi.shape[0])

    def neighbours(self, i: int) -> list[int]:
        """Agents j ≠ i whose model agent i receives (π[i, j] > 0)."""
        return [j for j in range(self.n) if j != i and self.pi[i, j] > 0]

    def degree(self, i: int) -> int:
        return len(self.neighbours(i))


def _check_n(name: str, n: int, minimum: int) -> None:
    if n < minimum:
        raise ValueError(f"the {name} topology needs at least {minimum} agents, got {n}")


def fully_connected(n: int) -> Topology:
    _check_n("fc", n, 1)
    return Topology("fc", np.full((n, n), 1.0 / n))


def ring(n: int) -> Topology:
    """Self and the two wrap-around neighbours, 1/3 each.

    The reference's N = 2 ring lists the same neighbour twice and its rows sum to 2/3, so N ≥ 3.
    """
    _check_n("ring", n, 3)
    pi = np.zeros((n, n))
    for i in range(n):
        pi[i, [i - 1, i, (i + 1) % n]] = 1.0 / 3.0
    return Topology("ring", pi)


def bipartite(n: int) -> Topology:
    """Two hubs (agents n−2, n−1) linked to every leaf; leaves and hubs not linked among them.

    a = ⌊100/(n−1)⌋/100 (computed as the reference does); leaf row: self 1−2a, each hub a;
    hub row: self 1−(n−2)a, each leaf a.
    """
    _check_n("bipartite", n, 3)
    a = math.floor((1 / (n - 1)) * 10**2) / 10**2
    b, c = 1 - (n - 2) * a, 1 - 2 * a
    pi = np.zeros((n, n))
    for leaf in range(n - 2):
        pi[leaf, leaf], pi[leaf, n - 2], pi[leaf, n - 1] = c, a, a
    for hub in (n - 2, n - 1):
        pi[hub, : n - 2] = a
        pi[hub, hub] = b
    return Topology("bipartite", pi)


def disconnected(n: int) -> Topology:
    _check_n("disconnected", n, 1)
    return Topology("disconnected", np.eye(n))


def make_topology(name: str, n: int) -> Topology:
    builders = {
        "fc": fully_connected,
        "ring": ring,
        "bipartite": bipartite,
        "disconnected": disconnected,
    }
    if name not in builders:
        raise ValueError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    return builders[name](n)


def topology_from_matrix(
    pi: Sequence[Sequence[float]] | np.ndarray, name: str = "custom", atol: float = 1e-6
) -> Topology:
    """A user-given mixing matrix: square, finite, non-negative, rows summing to 1."""
    arr = np.asarray(pi, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"the mixing matrix must be square and non-empty, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("the mixing matrix has non-finite entries")
    if (arr < 0).any():
        raise ValueError("the mixing matrix has negative entries")
    sums = arr.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > atol)
    if bad.size:
        raise ValueError(f"row {int(bad[0])} of the mixing matrix sums to {sums[bad[0]]}, not 1")
    return Topology(name, arr)


# ------------------------------------------------------------------------------------------
# Permutation specs


@dataclass(frozen=True)
class AlignmentPoint:
    """One set of units matched across models.

    ``tap``: name of the module whose input is the activation (channels on dim 1; spatial
    positions become samples). ``axes``: every (state-dict key, axis) reordered by this point.
    """

    name: str
    tap: str
    axes: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class PermutationSpec:
    points: tuple[AlignmentPoint, ...]

    def sizes(self, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Number of units of each point; raises when the spec does not fit ``state``."""
        seen: set[tuple[str, int]] = set()
        sizes: dict[str, int] = {}
        names = [p.name for p in self.points]
        if len(set(names)) != len(names):
            raise ValueError("alignment point names must be unique")
        for point in self.points:
            if not point.axes:
                raise ValueError(f"alignment point {point.name!r} permutes no tensor")
            for key, axis in point.axes:
                if key not in state:
                    raise ValueError(f"point {point.name!r}: no tensor {key!r} in the state dict")
                if (key, axis) in seen:
                    raise ValueError(f"({key!r}, axis {axis}) is permuted by two points")
                seen.add((key, axis))
                t = state[key]
                if not -t.dim() <= axis < t.dim():
                    raise ValueError(f"point {point.name!r}: {key!r} has no axis {axis}")
                size = int(t.shape[axis])
                if sizes.setdefault(point.name, size) != size:
                    raise ValueError(
                        f"point {point.name!r}: {key!r} axis {axis} has {size} units, "
                        f"other tensors of the point have {sizes[point.name]}"
                    )
        return sizes

    def by_key(self) -> dict[str, list[tuple[int, str]]]:
        """key -> [(axis, point name)] for every permuted tensor."""
        out: dict[str, list[tuple[int, str]]] = {}
        for point in self.points:
            for key, axis in point.axes:
                out.setdefault(key, []).append((axis, point.name))
        return out


def permute_tensor(
    t: torch.Tensor, moves: Sequence[tuple[int, str]], perms: Permutations
) -> torch.Tensor:
    for axis, point in moves:
        t = t.index_select(axis, perms[point])
    return t


def apply_permutations(
    state: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Permutations
) -> StateDict:
    """A new state dict with every tensor named by ``spec`` reordered by ``perms``."""
    moves = spec.by_key()
    return {k: permute_tensor(v, moves.get(k, ()), perms) for k, v in state.items()}


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)


def sequential_spec(model: nn.Sequential) -> PermutationSpec:
    """The spec of a plain chain of Linear/Conv2d layers (no residuals), e.g. an MLP.

    Every weight layer but the last opens an alignment point (its outputs, its bias, the
    norm right after it) that the next weight layer closes (its inputs; the tap). Parameter-
    free modules (activations, pooling, dropout) are passed through; anything else is refused.
    """
    points: list[AlignmentPoint] = []
    open_axes: list[tuple[str, int]] | None = None
    for name, module in model.named_children():
        if isinstance(module, nn.Linear | nn.Conv2d):
            if open_axes is not None:
                points.append(
                    AlignmentPoint(f"{name}.in", name, (*open_axes, (f"{name}.weight", 1)))
                )
            open_axes = [(f"{name}.weight", 0)]
            if module.bias is not None:
                open_axes.append((f"{name}.bias", 0))
        elif isinstance(module, _NORMS):
            if open_axes is None:
                raise ValueError(f"norm {name!r} before any weight layer is not supported")
            keys = ["weight", "bias"]
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                keys += ["running_mean", "running_var"]
            open_axes += [(f"{name}.{k}", 0) for k in keys if getattr(module, k) is not None]
        elif next(module.parameters(), None) is not None or isinstance(module, nn.Flatten):
            raise ValueError(f"sequential_spec cannot handle module {name!r} ({module})")
    return PermutationSpec(tuple(points))


# ------------------------------------------------------------------------------------------
# Models, BatchNorm reset, activation statistics


@dataclass(frozen=True)
class Layout:
    """An anchor's tensors (names, shapes, dtypes), which every neighbour's must match."""

    infos: Mapping[str, TensorInfo]
    float_names: tuple[str, ...]

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> Layout:
        infos = tensor_infos(StateDictCheckpoint(state), resolved=())
        return cls(infos, tuple(n for n, info in infos.items() if info.meta.is_float))


def load_source(source: Source, layout: Layout | None = None, label: str = "<memory>") -> StateDict:
    """Weights from a state dict (copied), a checkpoint path (what ``contmerge.sources.recognise``
    tells: a .safetensors or torch file, a model directory; not an adapter), or a loader
    callable. With ``layout`` its names, shapes and dtypes are checked against it first
    (``contmerge.checks``, from headers for a path), so a neighbour that does not fit the
    anchor is refused naming file, tensor and reason."""
    if isinstance(source, str | Path):
        found = recognise(source)
        check_full_weights(found, "DIMAT")
        with open_checkpoint(found) as checkpoint:
            if layout is not None:
                check_layout(checkpoint, layout.infos, layout.float_names)
            return {name: checkpoint.read(name) for name in checkpoint.meta}
    state = dict(source) if isinstance(source, Mapping) else dict(source())
    if layout is not None:
        check_layout(StateDictCheckpoint(state, label), layout.infos, layout.float_names)
    # copied: the module built on these tensors resets its BatchNorm statistics in place
    return (
        {k: v.detach().clone() for k, v in state.items()} if isinstance(source, Mapping) else state
    )


def build_model(factory: ModelFactory, source: Source, layout: Layout | None = None) -> nn.Module:
    """A module holding ``source``'s weights without an extra copy (``assign=True``); with
    ``layout``, checked against it first (``load_source``)."""
    state = load_source(source, layout)
    with torch.device("meta"):
        module = factory()
    module.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        # Non-persistent buffers are not in the state dict: build on CPU and copy instead.
        module = factory()
        module.load_state_dict(state, strict=True)
    return module.eval()


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def reset_bn(module: nn.Module, calibration: Iterable[torch.Tensor]) -> nn.Module:
    """Recompute BatchNorm running statistics as a cumulative average over one calibration pass
    (momentum=None, train mode), then restore momentum and eval mode."""
    norms = _batchnorms(module)
    if not norms:
        return module.eval()
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = None
        m.reset_running_stats()
    module.train()
    for x in calibration:
        module(x)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    return module.eval()


def cumulative_bn(module: nn.Module) -> nn.Module:
    """BatchNorm momentum None, as the reference leaves it after its reset: training then keeps
    a cumulative average of batch statistics, counted on from ``num_batches_tracked``."""
    for m in _batchnorms(module):
        m.momentum = None
    return module


class _Taps:
    """Forward pre-hooks capturing the input of each alignment point's tap module."""

    def __init__(self, module: nn.Module, spec: PermutationSpec) -> None:
        modules = dict(module.named_modules())
        self.values: dict[str, torch.Tensor] = {}
        self.handles = []
        for point in spec.points:
            if point.tap not in modules:
                raise ValueError(f"point {point.name!r}: no module named {point.tap!r}")
            self.handles.append(modules[point.tap].register_forward_pre_hook(self._hook(point)))

    def _hook(self, point: AlignmentPoint) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            # (B, C, ...) -> (C, B·...): spatial positions are samples, as in the reference.
            self.values[point.name] = x.detach().transpose(0, 1).reshape(x.shape[1], -1)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class PairStats:
    """Running sums for the anchor-vs-neighbour correlation at one alignment point (float64)."""

    def __init__(self, d: int) -> None:
        f64 = torch.float64
        self.n = 0
        self.sa, self.sb = torch.zeros(d, dtype=f64), torch.zeros(d, dtype=f64)
        self.saa, self.sbb = torch.zeros(d, dtype=f64), torch.zeros(d, dtype=f64)
        self.sab = torch.zeros(d, d, dtype=f64)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double(), b.double()
        self.n += a.shape[1]
        self.sa += a.sum(1)
        self.sb += b.sum(1)
        self.saa += (a * a).sum(1)
        self.sbb += (b * b).sum(1)
        self.sab.addmm_(a, b.T)  # in place: no d×d temporary per batch

    def correlation(self) -> torch.Tensor:
        """cov(a, b) / clamp(σ_a σ_bᵀ, 1e-7), population moments over all positions.

        Computed in place in the cross-moment buffer (one d×d temporary): the statistics are
        the only part of the merge whose size is not a multiple of the model's.
        """
        mu_a, mu_b = self.sa / self.n, self.sb / self.n
        sd_a = (self.saa / self.n - mu_a**2).clamp_min(0).sqrt()
        sd_b = (self.sbb / self.n - mu_b**2).clamp_min(0).sqrt()
        cov = self.sab.div_(self.n).addr_(mu_a, mu_b, alpha=-1)
        self.sab = None  # type: ignore[assignment]
        return cov.div_(torch.outer(sd_a, sd_b).clamp_min_(CORR_EPS))


@torch.no_grad()
def pair_statistics(
    anchor: nn.Module,
    neighbour: nn.Module,
    spec: PermutationSpec,
    calibration: Iterable[torch.Tensor],
) -> dict[str, PairStats]:
    """Anchor-vs-neighbour moments at every point (``.correlation()``: anchor units ×
    neighbour units), both models in eval mode on the same calibration batches."""
    anchor.eval()
    neighbour.eval()
    taps_a, taps_b = _Taps(anchor, spec), _Taps(neighbour, spec)
    stats: dict[str, PairStats] = {}
    try:
        for x in calibration:
            anchor(x)
            neighbour(x)
            for point in spec.points:
                a, b = taps_a.values[point.name], taps_b.values[point.name]
                stats.setdefault(point.name, PairStats(a.shape[0])).update(a, b)
    finally:
        taps_a.remove()
        taps_b.remove()
    if not stats:
        raise ValueError("the calibration data is empty")
    return stats


def assignment(corr: torch.Tensor) -> torch.Tensor:
    """The permutation maximising the summed correlation: anchor unit k <- neighbour perm[k]."""
    _, cols = scipy.optimize.linear_sum_assignment(corr.numpy(), maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


@dataclass(frozen=True)
class MatchDiagnostics:
    """How far one point's assignment is from the identity.

    ``identity``: fraction of anchor units matched with the neighbour unit of the same index;
    ``matched``/``diagonal``: mean correlation of the assigned pairs / of the same-index pairs
    (matched ≥ diagonal; equal when the assignment is the identity).
    """

    identity: float
    matched: float
    diagonal: float


def match_permutations(
    stats: dict[str, PairStats], diagnostics: dict[str, MatchDiagnostics] | None = None
) -> Permutations:
    """Per point, the assignment on the anchor-vs-neighbour correlation; frees each point's
    statistics as soon as its permutation is known. Fills ``diagnostics`` when given."""
    perms: Permutations = {}
    for name in list(stats):
        corr = stats.pop(name).correlation()
        perm = assignment(corr)
        perms[name] = perm
        if diagnostics is not None:
            units = torch.arange(len(perm))
            diagnostics[name] = MatchDiagnostics(
                identity=float((perm == units).double().mean()),
                matched=float(corr[units, perm].mean()),
                diagonal=float(corr.diagonal().mean()),
            )
    return perms


# ------------------------------------------------------------------------------------------
# The merge


class DimatFold:
    """DIMAT's merge for one agent, one neighbour at a time.

    ``A ← π_ii·θ_i``; for each neighbour j: reset j's BatchNorm on the calibration data,
    correlate anchor and j per alignment point, solve the assignment, ``A += π_ij·P_j(θ_j)``;
    :meth:`finish` resets the BatchNorm statistics of A. Each P_j depends only on the anchor,
    θ_j and the calibration data, so this equals the reference's K-way merge.

    ``calibration`` must yield the same batches every time it is iterated (a list of input
    tensors is simplest). Holds the anchor, the accumulator and one neighbour at a time.
    """

    def __init__(
        self,
        anchor: Source,
        self_weight: float,
        *,
        model_factory: ModelFactory,
        spec: PermutationSpec,
        calibration: Sequence[torch.Tensor],
    ) -> None:
        self.factory, self.spec, self.calibration = model_factory, spec, calibration
        self.anchor = reset_bn(build_model(model_factory, anchor), calibration)
        state = self.anchor.state_dict()
        self.layout = Layout.of(state)  # every neighbour's must match (contmerge.checks)
        self.sizes = spec.sizes(state)
        self.moves = spec.by_key()
        self.total_weight = float(self_weight)
        # Integer buffers (BatchNorm's num_batches_tracked) are not averaged: the reset sets them.
        self.acc: StateDict | None = {
            k: v * self_weight if v.is_floating_point() else v.clone() for k, v in state.items()
        }
        self.folded = 0
        #: per folded neighbour, per alignment point: how far its assignment is from the identity
        self.diagnostics: list[dict[str, MatchDiagnostics]] = []

    def add(self, neighbour: Source, weight: float) -> Permutations:
        """Fold one neighbour with mixing weight ``weight``; returns its permutations."""
        if self.acc is None:
            raise RuntimeError("this fold is finished")
        model = reset_bn(build_model(self.factory, neighbour, self.layout), self.calibration)
        diagnostics: dict[str, MatchDiagnostics] = {}
        perms = match_permutations(
            pair_statistics(self.anchor, model, self.spec, self.calibration), diagnostics
        )
        self.diagnostics.append(diagnostics)
        for name, perm in perms.items():
            if len(perm) != self.sizes[name]:
                raise ValueError(
                    f"point {name!r}: the tap has {len(perm)} channels, the spec's tensors "
                    f"{self.sizes[name]}"
                )
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                self.acc[key].add_(
                    permute_tensor(value, self.moves.get(key, ()), perms), alpha=weight
                )
        del model
        self.total_weight += float(weight)
        self.folded += 1
        return perms

    def restore(self, acc: Mapping[str, torch.Tensor], total_weight: float, folded: int) -> None:
        """Continue a fold saved after ``folded`` neighbours (``acc``: the accumulator then)."""
        if self.acc is None or acc.keys() != self.acc.keys():
            raise ValueError("the saved accumulator does not hold this anchor's tensors")
        self.acc = {k: v.to(self.acc[k].dtype, copy=True) for k, v in acc.items()}
        self.total_weight, self.folded = float(total_weight), folded

    def finish(self, *, check_weights: bool = True, normalise: bool = False) -> StateDict:
        """The merged weights, BatchNorm statistics recomputed on the calibration data.
        ``normalise``: divide by the weights' sum (mixing weights given unnormalised)."""
        if self.acc is None:
            raise RuntimeError("this fold is finished")
        if normalise:
            for value in self.acc.values():
                if value.is_floating_point():
                    value.div_(self.total_weight)
        elif check_weights and abs(self.total_weight - 1.0) > 1e-6:
            raise ValueError(f"mixing weights sum to {self.total_weight}, not 1")
        merged = self.anchor  # the anchor is no longer needed: it becomes the merged model
        merged.load_state_dict(self.acc, strict=True, assign=True)
        self.acc = None
        reset_bn(merged, self.calibration)
        return {k: v.detach() for k, v in merged.state_dict().items()}


def dimat_merge(
    anchor: Source,
    self_weight: float,
    neighbours: Iterable[tuple[float, Source]],
    *,
    model_factory: ModelFactory,
    spec: PermutationSpec,
    calibration: Sequence[torch.Tensor],
    diagnostics: list[dict[str, MatchDiagnostics]] | None = None,
) -> StateDict:
    """Agent i's DIMAT merge. ``neighbours`` yields (π_ij, weights); a generator that loads
    each neighbour from disk keeps one neighbour in memory at a time. ``diagnostics`` is
    extended with one entry per folded neighbour. The simulations (in process and through
    Flower) and ``contmerge merge --strategy dimat`` (``contmerge.dimat_state``) all merge
    through :class:`DimatFold`."""
    fold = DimatFold(
        anchor, self_weight, model_factory=model_factory, spec=spec, calibration=calibration
    )
    for weight, source in neighbours:
        fold.add(source, weight)
    if diagnostics is not None:
        diagnostics.extend(fold.diagnostics)
    return fold.finish()


def weighted_average(
    sources: Iterable[tuple[float, Source]], *, check_weights: bool = True
) -> StateDict:
    """WA baseline: Σ_j π_ij θ_j over every float entry (BatchNorm buffers included, no reset,
    as the reference's WA); integer buffers are taken from the first source."""
    acc: StateDict | None = None
    total = 0.0
    for weight, source in sources:
        state = load_source(source)
        if acc is None:
            acc = {k: v * weight if v.is_floating_point() else v for k, v in state.items()}
        else:
            if state.keys() != acc.keys():
                raise ValueError("the models to average have different state-dict keys")
            for k, v in state.items():
                if v.is_floating_point():
                    acc[k].add_(v, alpha=weight)
        total += float(weight)
    if acc is None:
        raise ValueError("nothing to average")
    if check_weights and abs(total - 1.0) > 1e-6:
        raise ValueError(f"mixing weights sum to {total}, not 1")
    return acc


def neighbourhood(topology: Topology, i: int) -> tuple[float, list[tuple[int, float]]]:
    """(π_ii, [(j, π_ij) for each neighbour j]) of agent i."""
    return float(topology.pi[i, i]), [(j, float(topology.pi[i, j])) for j in topology.neighbours(i)]
