"""FW-Merging (Chen et al., ICCV 2025): merging as Frank-Wolfe over the hull of a model pool.

The merged model θ minimises a small data objective ℓ (cross-entropy on ~100 labelled samples per
target task) over the convex hull of candidate checkpoints. Each iteration computes ∇ℓ(θ) by
autograd, asks a linear minimisation oracle (LMO) for the best vertex, and moves toward it:

- hard: s = argmin_m Σ_p cos(∇_p ℓ(θ), θ_{m,p}) (the authors' code: cosine against the candidate's
  raw weights, per tensor, summed); θ ← θ + λ·γ_t·(s − θ), γ_t = 2/(t+2)·step_size. Start: task
  arithmetic over the pool (λ = 0.3), which is kept as an extra candidate ("initial").
- soft: per target task k an LMO on that task's own gradient, each picking a candidate not yet
  picked this iteration; then per-(candidate, tensor) coefficients w on δ_j = s_j − θ are learned
  by entropy minimisation (Adam) on unlabelled batches and θ ← θ + Σ_j w_j·δ_j. Start: the base.

Layer-wise granularity takes the argmin per tensor, composing s from several candidates. A tensor
whose best cosine is ≥ 0 (no candidate points downhill) still moves toward its argmin by default,
as the authors' ViT code (``fw_hard.py``/``fw_soft.py``, where zeroing is commented out);
``uphill_layers="zero"`` moves it toward zeros as their NLP code does, ``"skip"`` leaves it.

Starts (``init``): task arithmetic over the pool (λ = 0.3; ``fw_hard.yaml``), the base (soft),
any checkpoint, or ``"adamerging"``: AdaMerging's layer-wise coefficients over the whole pool
(init 0.3, Adam lr 1e−3, no clamp) learned by entropy on the objective's unlabelled inputs; the
paper's vision headline starts FW-hard there (README: 3 iterations, step 0.01, layer-wise).
:data:`PRESETS` holds the YAML defaults and the README's headline settings side by side.

Memory does not grow with the pool: the pool stays on disk and is streamed one tensor at a time
each iteration. An LMO pass keeps only per-(candidate, tensor) scalars; the step then re-reads the
chosen tensors. Hard holds θ and ∇ℓ(θ); soft holds θ, one task gradient at a time, and the k
selected task vectors while it learns their coefficients. The AdaMerging start streams the pool
twice per Adam step (θ from the coefficients; then ∂L/∂w_{m,l} = ⟨∂L/∂θ_l, τ_{m,l}⟩), holding θ,
its gradient and the (candidates × tensors) coefficients.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from contmerge.atomic import atomic_open
from contmerge.checks import check_full_weights, check_layout
from contmerge.errors import CheckpointError
from contmerge.layout import compute_dtype, tensor_infos
from contmerge.sources import Checkpoint, open_checkpoint
from contmerge.tensorfile import write_safetensors

Variant = Literal["hard", "soft"]
Granularity = Literal["task", "layer"]
Lmo = Literal["cosine", "inner_product"]
Uphill = Literal["argmin", "skip", "zero"]
PoolSource = str | Path | Mapping[str, Tensor]
Params = dict[str, Tensor]
INITIAL_LABEL = "initial"
ZEROS_LABEL = "zeros"
ZERO = -1  # a layer-wise choice: step toward zeros (the authors' NLP code for uphill tensors)

#: The authors' settings side by side: their YAML defaults (``fw_hard.yaml``/``fw_soft.yaml``)
#: and the vision headline runs of their README (hmarkc/fusion_bench @ 837742d).
PRESETS: dict[str, dict[str, object]] = {
    "hard": dict(variant="hard", init="task_arithmetic", max_iters=10, step_size=0.1,
                 granularity="task"),
    "hard-headline": dict(variant="hard", init="adamerging", max_iters=3, step_size=0.01,
                          granularity="layer"),
    "soft": dict(variant="soft", init="base", max_iters=10, ada_coeff=1e-8, granularity="task"),
    "soft-headline": dict(variant="soft", init="base", max_iters=5, ada_coeff=1e-2,
                          granularity="task"),
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Objectives


class Objective(Protocol):
    """What FW-Merging minimises, as a function of the merged tensors.

    ``params`` maps every float tensor name of the base to a tensor; losses must be
    differentiable in them. ``loss`` is the labelled objective of one target task (the LMO's
    gradient); ``adaptation_loss`` is the soft variant's unlabelled loss on batch ``step``.
    """

    tasks: Sequence[str]

    def loss(self, params: Mapping[str, Tensor], task: str) -> Tensor: ...

    def adaptation_loss(self, params: Mapping[str, Tensor], task: str, step: int) -> Tensor: ...


def entropy_loss(logits: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean Shannon entropy of the softmax, with the authors' ``log(p + eps)``."""
    probs = torch.softmax(logits, dim=-1)
    return -(probs * torch.log(probs + eps)).sum(dim=-1).mean()


class ClassifierObjective:
    """A shared model (the one merged) with one frozen head per target task.

    ``loss``: mean cross-entropy on that task's labelled samples (the authors use 100 per task).
    ``adaptation_loss``: entropy on batch ``step`` of the task's unlabelled inputs, drawn like an
    endless shuffled loader (a new seeded permutation per epoch, ``batch_size`` 16 as the authors).
    """

    def __init__(
        self,
        model: nn.Module,
        heads: Mapping[str, nn.Module],
        labelled: Mapping[str, tuple[Tensor, Tensor]],
        unlabelled: Mapping[str, Tensor] | None = None,
        *,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        missing = [t for t in labelled if t not in heads]
        if missing:
            raise KeyError(f"no head for task(s) {missing}")
        self.model = model
        self.heads = {t: heads[t].requires_grad_(False) for t in labelled}
        self.labelled = dict(labelled)
        self.unlabelled = dict(unlabelled or {})
        self.tasks: list[str] = list(labelled)
        self.batch_size = batch_size
        self.seed = seed
        self._perms: dict[tuple[str, int], Tensor] = {}

    def logits(self, params: Mapping[str, Tensor], task: str, x: Tensor) -> Tensor:
        features = torch.func.functional_call(self.model, dict(params), (x,))
        return self.heads[task](features)

    def loss(self, params: Mapping[str, Tensor], task: str) -> Tensor:
        x, y = self.labelled[task]
        return nn.functional.cross_entropy(self.logits(params, task, x), y)

    def adaptation_loss(self, params: Mapping[str, Tensor], task: str, step: int) -> Tensor:
        return entropy_loss(self.logits(params, task, self.batch(task, step)))

    def batch(self, task: str, step: int) -> Tensor:
        data = self.unlabelled.get(task)
        if data is None or len(data) == 0:
            raise KeyError(f"no unlabelled inputs for task {task!r} (the soft variant needs them)")
        per_epoch = math.ceil(len(data) / self.batch_size)
        epoch, index = divmod(step, per_epoch)
        key = (task, epoch)
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[0] != task}  # keep one/task
            # sha256, not hash(): stable across processes
            digest = hashlib.sha256(f"{self.seed}/{task}/{epoch}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            self._perms[key] = torch.randperm(len(data), generator=gen)
        idx = self._perms[key][index * self.batch_size : (index + 1) * self.batch_size]
        return data[idx]


# --------------------------------------------------------------------------------------------
# Records


@dataclass
class IterationRecord:
    """What one FW iteration did (JSON-able).

    ``choices[key][tensor]`` is the candidate whose tensor the step moved toward (None: skipped),
    per gradient: key "all" for hard (the summed objective), the task name for soft. ``scores``
    are Σ over tensors of the LMO metric per candidate. ``fw_gap`` is ⟨g, θ − s⟩ over the tensors
    stepped (≥ 0 means s is a descent direction for the paper's linear LMO).
    """

    iteration: int
    loss: float
    step: float | None
    choices: dict[str, dict[str, str | None]]
    scores: dict[str, dict[str, float]]
    fw_gap: dict[str, float]
    coefficients: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def selected(self, key: str = "all") -> list[str]:
        """Distinct candidates used for ``key``, in order of first use."""
        return list(dict.fromkeys(c for c in self.choices[key].values() if c is not None))


@dataclass(frozen=True)
class _Entry:
    label: str
    source: PoolSource


@dataclass
class _Scores:
    """LMO pass over candidates: per-(candidate, tensor) cosine and ⟨g_p, θ_{m,p}⟩, float64."""

    cos: Tensor
    dot: Tensor
    theta_dot: Tensor  # ⟨g_p, θ_p⟩ per tensor


# --------------------------------------------------------------------------------------------
# The merger


class FrankWolfeMerger:
    """FW-Merging over a pool of checkpoints of one base, streamed from disk.

    ``FrankWolfeMerger(base, pool, objective, variant="hard", granularity="task")``; ``pool`` is
    a directory of ``.safetensors`` files (sorted by name), or a sequence of files / state dicts,
    or a mapping label → source. ``run(n)`` does n iterations (default ``max_iters``);
    ``merged()`` returns the current θ in the base's dtypes. ``add(candidate)`` is a continual
    arrival: it joins the pool; θ, the iteration counter (so γ_t) and the "initial" candidate are
    unchanged, and only iterations run afterwards (``add(..., iterations=n)`` or ``run``) can
    move θ toward it. θ is initialised at the first ``run``/``merged`` from the pool as it is
    then. Defaults are the authors' (``fw_hard.yaml``, ``fw_soft.yaml``).
    """

    def __init__(
        self,
        base: PoolSource | Checkpoint,
        pool: Sequence[PoolSource] | Mapping[str, PoolSource] | str | Path,
        objective: Objective,
        variant: Variant = "hard",
        granularity: Granularity = "task",
        *,
        lmo: Lmo = "cosine",
        uphill_layers: Uphill = "argmin",
        init: str | PoolSource | None = None,
        max_iters: int = 10,
        step_size: float = 0.1,
        scaling_factor: float = 0.3,
        keep_initial: bool = True,
        ada_iters: int = 500,
        ada_lr: float = 1e-3,
        ada_init: float = 0.3,
        ada_coeff: float = 1e-8,
        adamerging_iters: int = 1000,
        adamerging_lr: float = 1e-3,
        adamerging_init: float = 0.3,
        work_dir: str | Path | None = None,
        progress: bool = False,
    ) -> None:
        _check_choice("variant", variant, ("hard", "soft"))
        _check_choice("granularity", granularity, ("task", "layer"))
        _check_choice("lmo", lmo, ("cosine", "inner_product"))
        _check_choice("uphill_layers", uphill_layers, ("argmin", "skip", "zero"))
        if uphill_layers == "zero" and variant == "soft":
            raise ValueError("uphill_layers='zero' is the authors' hard NLP rule; soft has none")
        self.variant, self.granularity, self.lmo = variant, granularity, lmo
        self.uphill_layers = uphill_layers
        self.adamerging_iters, self.adamerging_lr = adamerging_iters, adamerging_lr
        self.adamerging_init = adamerging_init
        #: what the start did (AdaMerging: its losses and coefficients), JSON-able
        self.start_record: dict[str, object] = {}
        self.objective = objective
        self.init = (
            init if init is not None else ("task_arithmetic" if variant == "hard" else "base")
        )
        self.max_iters, self.step_size, self.scaling_factor = max_iters, step_size, scaling_factor
        self.keep_initial = keep_initial and variant == "hard"  # soft's code keeps no start vertex
        self.ada_iters, self.ada_lr = ada_iters, ada_lr
        self.ada_init, self.ada_coeff = ada_init, ada_coeff
        self.progress = progress
        self._own_base = not isinstance(base, Checkpoint)  # a caller's Checkpoint stays open
        self.base = open_checkpoint(base) if self._own_base else base
        self.names = [n for n, m in self.base.meta.items() if m.is_float]
        self.dtypes = {n: compute_dtype(self.base.meta[n].dtype) for n in self.names}
        # the layout arrivals are checked against (which weights are linear does not matter)
        self.infos = tensor_infos(self.base, resolved=())
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="fw-merge-"))
        self.pool: list[_Entry] = []
        self._theta: Params | None = None
        self._initial: _Entry | None = None
        self._ada_step = 0  # position in the endless unlabelled loaders, kept across iterations
        self.iteration = 0
        self.history: list[IterationRecord] = []
        for label, source in _pool_items(pool):
            self.add(source, label=label)

    @classmethod
    def from_preset(
        cls,
        name: str,
        base: PoolSource | Checkpoint,
        pool: Sequence[PoolSource] | Mapping[str, PoolSource] | str | Path,
        objective: Objective,
        **overrides: object,
    ) -> FrankWolfeMerger:
        """A merger with the settings of :data:`PRESETS` ``[name]``, then ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(base, pool, objective, **{**PRESETS[name], **overrides})  # type: ignore[arg-type]

    # --- pool -----------------------------------------------------------------------------
    def add(
        self, candidate: PoolSource, label: str | None = None, *, iterations: int = 0
    ) -> list[IterationRecord]:
        """A new candidate joins the pool (checked against the base from its header), then
        ``iterations`` further FW iterations run. Nothing else changes."""
        label = self._unique_label(label or _default_label(candidate, len(self.pool)))
        entry = _Entry(label, candidate)
        with self._open(entry) as ckpt:
            self._check_layout(ckpt)
        self.pool.append(entry)
        return self.run(iterations) if iterations else []

    def _unique_label(self, label: str) -> str:
        taken = {e.label for e in self.pool} | {INITIAL_LABEL}
        out, k = label, 1
        while out in taken:
            k += 1
            out = f"{label}#{k}"
        return out

    def _check_layout(self, ckpt: Checkpoint) -> None:
        # the Merger's rule (contmerge.checks), so both refuse the same checkpoints alike
        check_full_weights(ckpt, "FW-Merging")
        check_layout(ckpt, self.infos, self.names)

    @contextmanager
    def _open(self, entry: _Entry) -> Iterator[Checkpoint]:
        ckpt = open_checkpoint(entry.source, self.base.meta)
        try:
            yield ckpt
        finally:
            ckpt.close()

    def _read(self, ckpt: Checkpoint, name: str) -> Tensor:
        return ckpt.read(name).to(self.dtypes[name])

    def _candidates(self) -> list[_Entry]:
        # the authors' dict order: the pool, then "initial"; the first minimum wins ties
        return self.pool + ([self._initial] if self._initial is not None else [])

    # --- start ----------------------------------------------------------------------------
    def _start(self) -> Params:
        if self._theta is not None:
            return self._theta
        if self.init == "task_arithmetic":
            theta = self._task_arithmetic_start()
        elif self.init == "adamerging":
            theta = self._adamerging_start()
        elif self.init == "base":
            # clone: an in-memory base would otherwise be updated in place with θ
            theta = {n: self._read(self.base, n).clone() for n in self.names}
        else:
            with self._open(_Entry("init", self.init)) as ckpt:
                self._check_layout(ckpt)
                theta = {n: self._read(ckpt, n).clone() for n in self.names}
        self._theta = theta
        if self.keep_initial:
            path = self.work_dir / "initial.safetensors"
            with atomic_open(path) as handle:
                write_safetensors(handle, theta)
            self._initial = _Entry(INITIAL_LABEL, path)
        return theta

    def _task_arithmetic_start(self) -> Params:
        """θ0 + λ·Σ_m (θ_m − θ0), summed in the authors' order, one candidate at a time."""
        total = {n: torch.zeros(self.base.meta[n].shape, dtype=self.dtypes[n]) for n in self.names}
        for entry in self.pool:
            with self._open(entry) as ckpt:
                for n in self.names:
                    total[n] += self._task_vector(ckpt, n)
        for n in self.names:
            total[n] = self._read(self.base, n) + total[n] * self.scaling_factor
        return total

    def _task_vector(self, ckpt: Checkpoint, name: str) -> Tensor:
        return self._read(ckpt, name) - self._read(self.base, name)

    def _adamerging_start(self) -> Params:
        """AdaMerging over the pool: θ = θ0 + Σ_m w_{m,l}·τ_{m,l}, w (candidates × tensors) from
        ``adamerging_init``, Adam (lr ``adamerging_lr``) on Σ_k entropy of the objective's
        unlabelled batches, no clamp (FusionBench's ``clip_layer_wise_adamerging``).

        Streamed: each step builds θ in one pass over the pool, takes ∂L/∂θ by autograd, and
        gets ∂L/∂w_{m,l} = ⟨∂L/∂θ_l, τ_{m,l}⟩ in a second pass; the same gradient autograd
        would give through the merge, in memory independent of the pool size.
        """
        if not self.pool:
            raise ValueError("the AdaMerging start needs a non-empty pool")
        started = time.perf_counter()
        weights = torch.full((len(self.pool), len(self.names)), float(self.adamerging_init))
        weights.requires_grad_(True)
        optimizer = torch.optim.Adam([weights], lr=self.adamerging_lr)
        losses = []
        for _ in range(self.adamerging_iters):
            theta = self._weighted_pool(weights.detach())
            params = {n: theta[n].requires_grad_(True) for n in self.names}
            with torch.enable_grad():
                loss = sum(
                    self.objective.adaptation_loss(params, task, self._ada_step)
                    for task in self.objective.tasks
                )
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            self._ada_step += 1
            losses.append(float(loss.detach()))
            grad_w = torch.zeros_like(weights)
            for i, entry in enumerate(self.pool):
                with self._open(entry) as ckpt:
                    for j, (n, g) in enumerate(zip(self.names, grads)):
                        if g is not None:
                            grad_w[i, j] = _dot(g, self._task_vector(ckpt, n))
            optimizer.zero_grad()
            weights.grad = grad_w
            optimizer.step()
        final = weights.detach()
        self.start_record = {
            "kind": "adamerging",
            "iterations": self.adamerging_iters,
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "mean_coefficient": {e.label: float(final[i].mean()) for i, e in enumerate(self.pool)},
            "seconds": round(time.perf_counter() - started, 2),
        }
        return self._weighted_pool(final)

    def _weighted_pool(self, weights: Tensor) -> Params:
        """θ0 + Σ_m w_{m,l}·τ_{m,l}, one candidate at a time."""
        theta = {n: self._read(self.base, n).clone() for n in self.names}
        for i, entry in enumerate(self.pool):
            with self._open(entry) as ckpt:
                for j, n in enumerate(self.names):
                    theta[n] += float(weights[i, j]) * self._task_vector(ckpt, n)
        return theta

    # --- durable states (contmerge.fw_state) ----------------------------------------------
    def start(self) -> Params:
        """θ at the start (computed from the pool as it is now, once; later calls return the
        current θ). With ``keep_initial`` the start is also written as the "initial" candidate
        ``work_dir/initial.safetensors``."""
        return self._start()

    @property
    def started(self) -> bool:
        return self._theta is not None

    def restore(
        self,
        theta: Mapping[str, Tensor],
        *,
        iteration: int,
        ada_step: int,
        history: Sequence[IterationRecord] = (),
        initial: str | Path | None = None,
        start_record: Mapping[str, object] | None = None,
    ) -> None:
        """Continue from a saved θ and counters, as if the iterations that made it had run in
        this object (``initial``: the saved start candidate)."""
        missing = [n for n in self.names if n not in theta]
        if missing:
            raise CheckpointError("θ", "tensor of the base is missing", missing[0])
        self._theta = {n: theta[n].to(self.dtypes[n], copy=True) for n in self.names}
        self.iteration, self._ada_step = iteration, ada_step
        self.history = list(history)
        self.start_record = dict(start_record or {})
        self._initial = _Entry(INITIAL_LABEL, Path(initial)) if initial is not None else None

    @property
    def ada_step(self) -> int:
        """Position in the endless unlabelled loaders (saved with θ to resume exactly)."""
        return self._ada_step

    @property
    def initial_path(self) -> Path | None:
        return Path(self._initial.source) if self._initial is not None else None  # type: ignore[arg-type]

    def theta(self) -> Params:
        """The current θ in the compute dtypes (not copied: do not modify)."""
        return self._start()

    # --- iterations -----------------------------------------------------------------------
    def run(self, iterations: int | None = None) -> list[IterationRecord]:
        """Run FW iterations (``max_iters`` by default); the step schedule continues from
        ``self.iteration``. Returns their records (also appended to ``history``)."""
        self._start()
        count = self.max_iters if iterations is None else iterations
        records = []
        for _ in tqdm(range(count), desc=f"FW-{self.variant}", disable=not self.progress):
            started = time.perf_counter()
            record = self._hard_iteration() if self.variant == "hard" else self._soft_iteration()
            record.seconds = round(time.perf_counter() - started, 4)
            self.iteration += 1
            self.history.append(record)
            records.append(record)
        return records

    def _gradient(self, tasks: Sequence[str]) -> tuple[Params, float]:
        """∇ Σ_k ℓ_k(θ) by autograd (tensors without a path to the loss get zero)."""
        theta = self._start()
        params = {n: theta[n].detach().requires_grad_(True) for n in self.names}
        with torch.enable_grad():
            loss = sum(self.objective.loss(params, task) for task in tasks)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        out = {
            n: (g if g is not None else torch.zeros_like(theta[n])).detach()
            for n, g in zip(self.names, grads)
        }
        return out, float(loss.detach())

    def _score(self, grad: Params, candidates: Sequence[_Entry]) -> _Scores:
        """One streamed pass: cos(g_p, θ_{m,p}) and ⟨g_p, θ_{m,p}⟩ for every candidate m."""
        shape = (len(candidates), len(self.names))
        cos = torch.zeros(shape, dtype=torch.float64)
        dot = torch.zeros(shape, dtype=torch.float64)
        theta = self._start()
        grad_norms = [float(grad[n].double().norm()) for n in self.names]
        theta_dot = torch.tensor([_dot(grad[n], theta[n]) for n in self.names], dtype=torch.float64)
        for i, entry in enumerate(candidates):
            with self._open(entry) as ckpt:
                for j, n in enumerate(self.names):
                    w = ckpt.read(n)
                    d = _dot(grad[n], w)
                    norm = grad_norms[j] * float(w.double().norm())
                    dot[i, j] = d
                    cos[i, j] = d / norm if norm > 0 else 0.0  # 0/0 is "no preference"
        return _Scores(cos, dot, theta_dot)

    def _select(self, scores: _Scores, excluded: Sequence[set[int]]) -> list[int | None]:
        """The LMO: a candidate index per tensor (the same for all with task granularity).
        Layer-wise, a tensor where no candidate points downhill follows ``uphill_layers``: its
        argmin anyway, None (skipped) or :data:`ZERO`."""
        metric = scores.cos if self.lmo == "cosine" else scores.dot
        n_cand = metric.shape[0]
        if self.granularity == "task":
            banned = set().union(*excluded) if excluded else set()
            totals = metric.sum(dim=1).tolist()
            allowed = [i for i in range(n_cand) if i not in banned]
            if not allowed:
                return [None] * len(self.names)
            best = min(allowed, key=lambda i: (totals[i], i))  # first minimum, as `<` in the code
            return [best] * len(self.names)
        choice: list[int | None] = []
        for j in range(len(self.names)):
            allowed = [i for i in range(n_cand) if i not in excluded[j]]
            if not allowed:
                choice.append(None)
                continue
            column = metric[:, j].tolist()
            best = min(allowed, key=lambda i: (column[i], i))
            if self.lmo == "cosine":
                downhill = scores.cos[best, j] < 0
            else:  # the block's FW gap ⟨g_p, θ_p − s_p⟩ must be positive
                downhill = scores.theta_dot[j] - scores.dot[best, j] > 0
            if downhill or self.uphill_layers == "argmin":
                choice.append(best)
            else:
                choice.append(ZERO if self.uphill_layers == "zero" else None)
        return choice

    def _hard_iteration(self) -> IterationRecord:
        theta = self._start()
        t = self.iteration
        grad, loss = self._gradient(self.objective.tasks)
        candidates = self._candidates()
        scores = self._score(grad, candidates)
        del grad
        choice = self._select(scores, [set() for _ in self.names])
        # the authors' merge call: task_arithmetic(θ, [s], scaling = step·λ) = θ + (s − θ)·(step·λ)
        coef = (2 / (t + 2) * self.step_size) * self.scaling_factor
        for i, tensors in _group(choice).items():
            if i == ZERO:  # s_p = 0: the authors' NLP rule for uphill tensors
                for j in tensors:
                    theta[self.names[j]].add_(theta[self.names[j]].neg().mul_(coef))
                continue
            with self._open(candidates[i]) as ckpt:
                for j in tensors:
                    n = self.names[j]
                    theta[n].add_((self._read(ckpt, n) - theta[n]).mul_(coef))
        return IterationRecord(
            iteration=t,
            loss=loss,
            step=coef,
            choices={"all": self._choice_labels(choice, candidates)},
            scores={"all": _totals(scores, candidates, self.lmo)},
            fw_gap={"all": _gap(scores, choice)},
        )

    def _soft_iteration(self) -> IterationRecord:
        theta = self._start()
        t = self.iteration
        pool = self.pool
        excluded: list[set[int]] = [set() for _ in self.names]
        picks: list[tuple[str, list[int | None]]] = []
        record = IterationRecord(t, 0.0, None, {}, {}, {})
        for task in self.objective.tasks:
            if len(picks) >= len(pool):  # the code stops once every candidate is taken
                break
            grad, loss = self._gradient([task])
            scores = self._score(grad, pool)
            del grad
            choice = self._select(scores, excluded)
            for j, i in enumerate(choice):
                if i is not None:
                    excluded[j].add(i)
            picks.append((task, choice))
            record.loss += loss
            record.choices[task] = self._choice_labels(choice, pool)
            record.scores[task] = _totals(scores, pool, self.lmo)
            record.fw_gap[task] = _gap(scores, choice)
        if picks:
            deltas = self._deltas([c for _, c in picks])
            weights = self._adapt(deltas, self.ada_init if t == 0 else self.ada_coeff)
            with torch.no_grad():
                for l_idx, n in enumerate(self.names):
                    theta[n] = _combine(theta[n], deltas, weights, l_idx, n)
            for j, (task, _) in enumerate(picks):
                used = [w for n, w in zip(self.names, weights[j].tolist()) if n in deltas[j]]
                record.coefficients[task] = sum(used) / len(used) if used else 0.0
        return record

    def _deltas(self, picks: Sequence[Sequence[int | None]]) -> list[dict[str, Tensor]]:
        """δ_j = s_j − θ for each task's pick (tensors it skipped are absent), read once each."""
        theta = self._start()
        deltas: list[dict[str, Tensor]] = [{} for _ in picks]
        wanted: dict[int, list[tuple[int, int]]] = {}
        for j, choice in enumerate(picks):
            for l_idx, i in enumerate(choice):
                if i is not None:
                    wanted.setdefault(i, []).append((j, l_idx))
        for i, places in wanted.items():
            with self._open(self.pool[i]) as ckpt:
                for j, l_idx in places:
                    n = self.names[l_idx]
                    deltas[j][n] = self._read(ckpt, n) - theta[n]
        return deltas

    def _adapt(self, deltas: Sequence[Mapping[str, Tensor]], start: float) -> Tensor:
        """Learn w (picks × tensors) by Adam on Σ_k entropy, as AdaMerging's layer-wise weights
        (no clamp, no simplex projection: the authors' ``clamp_weights=False``)."""
        theta = self._start()
        weights = torch.full((len(deltas), len(self.names)), float(start), requires_grad=True)
        optimizer = torch.optim.Adam([weights], lr=self.ada_lr)
        with torch.enable_grad():
            for _ in range(self.ada_iters):
                params = {
                    n: _combine(theta[n], deltas, weights, l_idx, n)
                    for l_idx, n in enumerate(self.names)
                }
                loss = sum(
                    self.objective.adaptation_loss(params, task, self._ada_step)
                    for task in self.objective.tasks
                )
                self._ada_step += 1
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return weights.detach()

    def _choice_labels(
        self, choice: Sequence[int | None], candidates: Sequence[_Entry]
    ) -> dict[str, str | None]:
        return {n: _label_of(i, candidates) for n, i in zip(self.names, choice)}

    # --- output ---------------------------------------------------------------------------
    def merged(self) -> dict[str, Tensor]:
        """The current θ in the base's order and dtypes (non-float tensors: the base's)."""
        theta = self._start()
        return {
            name: theta[name].to(meta.dtype, copy=True) if meta.is_float else self.base.read(name)
            for name, meta in self.base.meta.items()
        }

    def save(self, path: str | Path) -> Path:
        """Write ``merged()`` as a safetensors file, atomically."""
        path = Path(path)
        with atomic_open(path) as handle:
            write_safetensors(handle, self.merged(), {"format": "pt", "contmerge": "frank_wolfe"})
        return path

    def close(self) -> None:
        if self._own_base:
            self.base.close()
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> FrankWolfeMerger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# helpers


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")


def _pool_items(
    pool: Sequence[PoolSource] | Mapping[str, PoolSource] | str | Path,
) -> list[tuple[str | None, PoolSource]]:
    if isinstance(pool, (str, Path)):
        directory = Path(pool)
        if not directory.is_dir():
            raise CheckpointError(str(directory), "a pool is a directory of .safetensors files")
        return [(p.stem, p) for p in sorted(directory.glob("*.safetensors"))]
    if isinstance(pool, Mapping):
        if any(isinstance(v, Tensor) for v in pool.values()):
            raise TypeError("pass a state dict as a one-element list: [state_dict]")
        return [(str(k), v) for k, v in pool.items()]
    return [(None, p) for p in pool]


def _default_label(source: PoolSource, index: int) -> str:
    return Path(source).stem if isinstance(source, (str, Path)) else f"candidate-{index}"


def _dot(a: Tensor, b: Tensor) -> float:
    """⟨a, b⟩ accumulated in float64 (the authors use the tensors' own float32)."""
    return float(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()))


def _group(choice: Sequence[int | None]) -> dict[int, list[int]]:
    """Tensor indices per chosen candidate, so each candidate file is opened once."""
    groups: dict[int, list[int]] = {}
    for j, i in enumerate(choice):
        if i is not None:
            groups.setdefault(i, []).append(j)
    return groups


def _totals(scores: _Scores, candidates: Sequence[_Entry], lmo: Lmo) -> dict[str, float]:
    metric = scores.cos if lmo == "cosine" else scores.dot
    return {e.label: float(v) for e, v in zip(candidates, metric.sum(dim=1).tolist())}


def _label_of(i: int | None, candidates: Sequence[_Entry]) -> str | None:
    if i is None:
        return None
    return ZEROS_LABEL if i == ZERO else candidates[i].label


def _gap(scores: _Scores, choice: Sequence[int | None]) -> float:
    """⟨g, θ − s⟩ over the tensors stepped (s_p = 0 for a ZERO choice)."""
    return float(
        sum(
            scores.theta_dot[j] - (0.0 if i == ZERO else scores.dot[i, j])
            for j, i in enumerate(choice)
            if i is not None
        )
    )


def _combine(
    theta: Tensor, deltas: Sequence[Mapping[str, Tensor]], weights: Tensor, l_idx: int, name: str
) -> Tensor:
    """θ_l + Σ_j w_{j,l}·δ_{j,l} (LayerWiseMergedModel's merge; skipped tensors add nothing)."""
    out = theta
    for j, delta in enumerate(deltas):
        if name in delta:
            out = out + weights[j, l_idx] * delta[name]
    return out
