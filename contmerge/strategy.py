"""The strategy protocol: pure per-tensor functions over a state, plus whole-model hooks.

A strategy is a small object, in the spirit of optax's transformations and torch.optim's
per-parameter state. For every float tensor of the base it declares the state it keeps
(``slots``), and the engine calls, one tensor at a time:

    init(info)                                -> state
    fold(info, state, delta, base, ctx)       -> new state      (delta = θ_t − θ0, compute dtype)
    emit(info, state, base, globals)          -> merged tensor  (compute dtype; the engine casts)

Whole-model quantities (OPCM's norms, TIES' global thresholds) live in ``globals``, a small
JSON-able dict that the engine persists in the manifest. A strategy that needs statistics of
the whole arrival before folding any tensor declares ``passes``: each pass sees every tensor's
delta and state once and writes its result into ``ctx.globals``. ``fold`` must not modify its
inputs in place: the previous state stays valid until the new one is committed.

Speed, as in torch.optim's fused optimisers: ``fold`` is the reference, written for clarity. A
rule whose every entry folds on its own declares ``elementwise``; the engine then folds flat
chunks of each tensor (a cache-sized piece at a time, on several threads) through ``fold_into``.
A rule with one state slot says how one entry folds, as a compiled function (``entry_fold``):
the engine builds one loop around it that reads the arrival, differences it against the base,
checks it and folds it in a single pass over memory. Tests hold both equal to ``fold``.

Discoverability: a rule's hyper-parameters are its dataclass fields, each declared with
:func:`setting` (default, one-line meaning, the paper's symbol); its class docstring's first line
says what it does. ``contmerge strategies`` lists both for every rule, third-party ones included
(:func:`settings_of`, :func:`summary_of`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from . import buffers
from .errors import StrategyError
from .kernels import transform_loop, update_loop
from .tensorfile import TensorMeta

State = dict[str, torch.Tensor]
#: flat chunks of a tensor's state slots, as numpy arrays (what compiled loops take)
Arrays = dict[str, np.ndarray]


def setting(default: Any, help: str, *, symbol: str | None = None) -> Any:
    """A hyper-parameter field of a strategy: ``alpha: float = setting(0.5, "…", symbol="α")``.

    ``help`` is the one-line meaning ``contmerge strategies`` shows; ``symbol`` is the paper's
    name for it (a misspelt setting such as ``lam`` is matched against it too).
    """
    metadata = {"help": help, **({"symbol": symbol} if symbol else {})}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Setting:
    """One hyper-parameter of a strategy class, as ``contmerge strategies`` shows it."""

    name: str
    type: str
    default: Any  # ``dataclasses.MISSING`` when the setting is required
    help: str
    symbol: str | None = None

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def describe(self) -> str:
        default = "required" if self.required else f"= {self.default!r}"
        symbol = f" ({self.symbol})" if self.symbol and self.symbol != self.name else ""
        return f"{self.name}: {self.type} {default}{symbol}"


def settings_of(cls: type) -> list[Setting]:
    """The hyper-parameters of a strategy or pre-processor class (its dataclass fields)."""
    if not dataclasses.is_dataclass(cls):
        return []
    found = []
    for f in fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        found.append(
            Setting(f.name, kind, default, f.metadata.get("help", ""), f.metadata.get("symbol"))
        )
    return found


def doc_of(cls: type) -> str:
    """The class docstring, else its module's: what the rule does (dedented)."""
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")  # its own, not a base class's
    if doc.startswith(f"{cls.__name__}("):  # the signature @dataclass writes when there is none
        doc = ""
    module = sys.modules.get(cls.__module__)
    return doc or inspect.cleandoc((module.__doc__ if module else "") or "")


def summary_of(cls: type) -> str:
    """The first paragraph of :func:`doc_of`, on one line."""
    return first_paragraph(doc_of(cls))


def first_paragraph(doc: str) -> str:
    return " ".join(doc.split("\n\n", 1)[0].split())


@dataclass(frozen=True)
class TensorInfo:
    """What a strategy may know about one tensor of the base."""

    name: str
    meta: TensorMeta
    #: True for the 2-D weight of an ``nn.Linear`` (OPCM projects only these)
    is_linear: bool
    #: dtype the engine computes and keeps state in (float32 for half precision bases)
    compute_dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.meta.shape

    def scalar(self, value: float) -> np.generic:
        """``value`` as a numpy scalar of the compute dtype (for ``EntryFold.params``)."""
        return buffers.numpy_dtype(self.compute_dtype).type(value)


@dataclass(frozen=True)
class EntryTransform:
    """A pre-processor as a compiled function of one entry (``contmerge.kernels.kernel``):
    ``transform(δ, position, params) -> δ'``, in δ's dtype; ``position`` (uint64) is the entry's
    index in the flattened tensor."""

    transform: Callable[..., Any]
    params: tuple[Any, ...] = ()


@dataclass(frozen=True)
class EntryFold:
    """A rule's fold as a compiled function of one entry: ``update(δ, old, params) -> new``, all
    in the compute dtype (pass scalars in ``params`` already cast, so arithmetic stays in that
    dtype, as torch's does). ``before`` is a pre-processor applied to δ first."""

    update: Callable[..., Any]
    params: tuple[Any, ...] = ()
    before: EntryTransform | None = None


@dataclass
class FoldContext:
    """Everything about the arrival being folded that is not one tensor."""

    #: 1-based position of this arrival among the folded ones
    index: int
    #: whole-model values carried between folds (read freely, update in ``end_fold``)
    globals: dict[str, Any]
    #: scratch space accumulated during this fold, handed to ``end_fold``
    stats: dict[str, Any] = field(default_factory=dict)
    #: per-arrival side statistics by kind (e.g. "fisher", "gram"), each a Checkpoint
    extras: Mapping[str, Any] = field(default_factory=dict)
    #: number of float entries in the whole model, and whether any is computed in float64
    numel: int = 0
    float64: bool = False
    #: this arrival's weight (rules with ``takes_weight``; 1 unless the user gave one)
    weight: float = 1.0
    #: where a rule's heavy per-tensor work runs (``Merger(device=...)``); None: where the
    #: tensors are (the CPU). State, inputs and results stay on the CPU
    device: torch.device | None = None
    #: the engine will fold with the rule's ``deferred_fold`` if it gives one (the rule
    #: ``defers``, the state is in memory, every tensor is chunked): its passes may leave the
    #: whole-model statistics that fold settles unfinished
    defer: bool = False

    def to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """The tensors on ``device`` for the work (unchanged when none is set); the caller hands
        its result back with ``.to(<input>.device)``."""
        if self.device is None:
            return list(tensors)
        return [t.to(self.device) for t in tensors]

    def extra(self, kind: str, name: str) -> torch.Tensor:
        """This arrival's ``kind`` statistic for tensor ``name`` (clear error if absent)."""
        from .errors import CheckpointError

        source = self.extras.get(kind)
        if source is None:
            raise CheckpointError(
                "<arrival>",
                f"this strategy needs {kind!r} statistics with each arrival; none were given",
                name,
            )
        if name not in source.meta:
            raise CheckpointError(source.source, f"no {kind!r} statistic for this tensor", name)
        return source.read(name)

    def key(self, salt: str) -> int:
        """A 64-bit key that depends only on the arrival index and ``salt`` (seed, tensor name):
        randomness drawn from it per entry position is the same however the tensor is cut."""
        digest = hashlib.sha256(f"{self.index}:{salt}".encode()).digest()
        return int.from_bytes(digest[:8], "little")

    def add_stat(self, key: str, value: float) -> None:
        self.stats[key] = self.stats.get(key, 0.0) + float(value)


#: ``chunk(start, arrival, base, old, out) -> Σ (arrival − base)²`` (NaN or Inf if any δ or
#: decided entry is): one flat chunk of a tensor, in the compute dtype, folded into ``out``
ChunkFold = Callable[[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray], float]


class DeferredFold:
    """An elementwise fold that starts before its whole-model statistics are known: every
    entry they cannot change is folded at once, the few others wait, and ``settle`` folds
    those when the last chunk is done (TIES: the entries near its thresholds). One per fold;
    ``chunk`` is called from several threads at once."""

    def chunk(self, info: TensorInfo) -> ChunkFold:
        raise NotImplementedError

    def settle(self, ctx: FoldContext) -> list[str] | None:
        """Fold the waiting entries into the ``out`` arrays they came from; the names of the
        tensors whose new state is not finite (empty if none), or None when the statistics
        could not be settled from what waited: the engine then folds the arrival again, with
        ``ctx.defer`` off."""
        raise NotImplementedError


class Pass:
    """A read-only sweep over the whole arrival before folding (see ``Strategy.passes``)."""

    #: what ``update`` gathers is a sum over entries: the engine may instead call
    #: ``update_chunk`` on flat chunks of each tensor, from several threads at once (with no δ
    #: tensor made: each chunk is differenced in cache), when the rule is elementwise
    elementwise: ClassVar[bool] = False
    #: an elementwise pass that only needs a look at the model: the engine hands it every
    #: ``sample``-th entry of each chunk (strided views of the state), differencing no others
    #: (None: every entry). The sample's own order is its positions, for pre-processors
    sample: int | None = None

    def update(self, info: TensorInfo, delta: torch.Tensor, state: State, ctx: FoldContext) -> None:
        raise NotImplementedError

    def update_chunk(
        self, info: TensorInfo, delta: np.ndarray, state: Arrays, ctx: FoldContext, start: int
    ) -> None:
        """``update`` for entries ``start : start + delta.size`` of the flattened tensor (numpy
        views in the compute dtype; ``delta`` is scratch). Must be safe to call concurrently."""
        raise NotImplementedError

    def finish(self, ctx: FoldContext) -> None:
        raise NotImplementedError


class Strategy:
    """Base class of merge rules. Subclasses are dataclasses whose fields are hyper-parameters."""

    name: ClassVar[str] = ""
    #: kinds of per-arrival statistics the rule needs (e.g. ("fisher",))
    needs_extras: ClassVar[tuple[str, ...]] = ()
    #: the rule weighs each arrival by ``ctx.weight`` (``Merger.fold(..., weight=)``)
    takes_weight: ClassVar[bool] = False

    # --- per-tensor functions -------------------------------------------------------------
    def slots(self, info: TensorInfo) -> dict[str, TensorMeta]:
        """State tensors kept for this tensor; default: one slot shaped like it."""
        return {"value": TensorMeta(info.shape, info.compute_dtype)}

    def init(self, info: TensorInfo) -> State:
        return {k: buffers.zeros(m.shape, m.dtype) for k, m in self.slots(info).items()}

    def fold(
        self,
        info: TensorInfo,
        state: State,
        delta: torch.Tensor,
        base: torch.Tensor,
        ctx: FoldContext,
    ) -> State:
        raise NotImplementedError

    def emit(
        self, info: TensorInfo, state: State, base: torch.Tensor, globals: Mapping[str, Any]
    ) -> torch.Tensor:
        raise NotImplementedError

    #: each entry's new state depends on that entry alone (and on ``ctx``), so the engine may
    #: call ``fold_into`` on flat chunks, several at once
    elementwise: ClassVar[bool] = False

    def fold_into(
        self,
        info: TensorInfo,
        out: Arrays,
        state: Arrays,
        delta: np.ndarray,
        base: np.ndarray,
        ctx: FoldContext,
        start: int,
    ) -> None:
        """Write ``fold(...)`` for one flat chunk into ``out`` (elementwise rules only).

        All are numpy views of entries ``start : start + delta.size`` of the flattened tensor, in
        the compute dtype; ``out`` never shares memory with the inputs, and ``delta`` is scratch
        the rule may overwrite. This default loops over ``entry_fold`` where the rule has one,
        else goes through torch; override it with a compiled loop that allocates nothing.
        """
        entry = self.entry_fold(info, ctx)
        if entry is not None:
            if entry.before is not None:
                step = entry.before
                transform_loop(step.transform)(step.params, np.uint64(start), delta)
            (slot,) = out
            update_loop(entry.update)(entry.params, delta, state[slot], out[slot])
            return
        as_torch = {k: torch.from_numpy(v) for k, v in state.items()}
        new = self.fold(info, as_torch, torch.from_numpy(delta), torch.from_numpy(base), ctx)
        for slot, value in new.items():
            np.copyto(out[slot], value.numpy())

    def entry_fold(self, info: TensorInfo, ctx: FoldContext) -> EntryFold | None:
        """How one entry folds, for an elementwise rule with a single state slot whose new
        value depends only on the entry's δ and old value; None (the default) otherwise."""
        return None

    #: the rule has a ``deferred_fold`` (the engine then sets ``ctx.defer`` where it can use it)
    defers: ClassVar[bool] = False

    def deferred_fold(self, ctx: FoldContext) -> DeferredFold | None:
        """This arrival's fold as a ``DeferredFold`` (single state slot, after the passes run
        with ``ctx.defer`` on), or None for the ordinary fold."""
        return None

    #: ``fold`` of one tensor is heavy and depends on that tensor alone: the engine may fold
    #: several whole tensors at once on its threads (``contmerge.parallel_folds``). Such a fold
    #: adds to ``ctx.stats`` only through ``add_stat``; the calls are replayed in tensor order
    per_tensor_parallel: ClassVar[bool] = False

    # --- whole-model hooks ----------------------------------------------------------------
    def init_globals(self) -> dict[str, Any]:
        return {}

    def passes(self, ctx: FoldContext) -> Iterable[Pass]:
        """Sweeps before the fold, run in order; a generator may decide what comes next from
        what the earlier ones left in ``ctx.stats`` (each is finished before the next is asked
        for)."""
        return ()

    def end_fold(self, globals: Mapping[str, Any], ctx: FoldContext) -> dict[str, Any]:
        """New globals after every tensor of an arrival was folded."""
        return dict(globals)

    # --- identity -------------------------------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    def spec(self) -> str:
        """A string that ``contmerge.registry.parse_strategy`` turns back into this strategy."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{self.name}({args})"


class Preprocessor:
    """A delta transform applied before a rule (DARE, magnitude trim); composes with ``chain``."""

    name: ClassVar[str] = ""
    #: the transform of each entry depends on that entry (and its position) alone: the engine
    #: may apply ``transform_into`` to flat chunks (see ``Strategy.elementwise``)
    elementwise: ClassVar[bool] = False

    def transform(self, info: TensorInfo, delta: torch.Tensor, ctx: FoldContext) -> torch.Tensor:
        raise NotImplementedError

    def transform_into(
        self, info: TensorInfo, delta: np.ndarray, ctx: FoldContext, start: int
    ) -> None:
        """``transform`` in place on entries ``start : start + delta.size`` of the flattened
        tensor (elementwise pre-processors); by default a loop over ``entry_transform``."""
        entry = self.entry_transform(info, ctx)
        if entry is None:
            raise NotImplementedError
        transform_loop(entry.transform)(entry.params, np.uint64(start), delta)

    def entry_transform(self, info: TensorInfo, ctx: FoldContext) -> EntryTransform | None:
        """The transform as a compiled function of one entry, or None."""
        return None

    def hparams(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    def spec(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{self.name}({args})"


class Chain(Strategy):
    """Pre-processors followed by one rule: ``chain(dare(p=0.9), magmax())``."""

    name = "chain"

    def __init__(self, *parts: Preprocessor | Strategy) -> None:
        if not parts or not isinstance(parts[-1], Strategy):
            raise StrategyError("chain(...) must end with a merge rule, e.g. chain(dare(), ties())")
        if not all(isinstance(p, Preprocessor) for p in parts[:-1]):
            raise StrategyError("every part of chain(...) but the last must be a pre-processor")
        self.pre: tuple[Preprocessor, ...] = tuple(parts[:-1])  # type: ignore[assignment]
        self.rule: Strategy = parts[-1]  # type: ignore[assignment]
        self.needs_extras = self.rule.needs_extras  # type: ignore[misc]
        self.takes_weight = self.rule.takes_weight  # type: ignore[misc]
        self.elementwise = self.rule.elementwise and all(  # type: ignore[misc]
            p.elementwise for p in self.pre
        )
        self.per_tensor_parallel = self.rule.per_tensor_parallel  # type: ignore[misc]

    def _pre(self, info: TensorInfo, delta: torch.Tensor, ctx: FoldContext) -> torch.Tensor:
        for step in self.pre:
            delta = step.transform(info, delta, ctx)
        return delta

    def slots(self, info: TensorInfo) -> dict[str, TensorMeta]:
        return self.rule.slots(info)

    def init(self, info: TensorInfo) -> State:
        return self.rule.init(info)

    def fold(
        self, info: TensorInfo, state: State, delta: Tensor, base: Tensor, ctx: FoldContext
    ) -> State:
        return self.rule.fold(info, state, self._pre(info, delta, ctx), base, ctx)

    def fold_into(
        self,
        info: TensorInfo,
        out: Arrays,
        state: Arrays,
        delta: np.ndarray,
        base: np.ndarray,
        ctx: FoldContext,
        start: int,
    ) -> None:
        for step in self.pre:
            step.transform_into(info, delta, ctx, start)  # delta is the engine's scratch
        self.rule.fold_into(info, out, state, delta, base, ctx, start)

    def entry_fold(self, info: TensorInfo, ctx: FoldContext) -> EntryFold | None:
        """The rule's, with a single pre-processor fused in front (more are not fused)."""
        entry = self.rule.entry_fold(info, ctx)
        if entry is None or not self.pre:
            return entry
        if len(self.pre) > 1 or entry.before is not None:
            return None
        before = self.pre[0].entry_transform(info, ctx)
        return None if before is None else replace(entry, before=before)

    def emit(
        self, info: TensorInfo, state: State, base: Tensor, globals: Mapping[str, Any]
    ) -> Tensor:
        return self.rule.emit(info, state, base, globals)

    def init_globals(self) -> dict[str, Any]:
        return self.rule.init_globals()

    def passes(self, ctx: FoldContext) -> Iterable[Pass]:
        return (_PreprocessedPass(p, self) for p in self.rule.passes(ctx))  # lazily, as the rule

    def end_fold(self, globals: Mapping[str, Any], ctx: FoldContext) -> dict[str, Any]:
        return self.rule.end_fold(globals, ctx)

    def hparams(self) -> dict[str, Any]:
        return {"parts": [p.spec() for p in (*self.pre, self.rule)]}

    def spec(self) -> str:
        return f"chain({', '.join(p.spec() for p in (*self.pre, self.rule))})"


class _PreprocessedPass(Pass):
    """A rule's pass sees the same pre-processed deltas its fold will see."""

    def __init__(self, inner: Pass, chain: Chain) -> None:
        self.inner, self.chain = inner, chain
        self.elementwise = inner.elementwise and chain.elementwise  # type: ignore[misc]
        self.sample = inner.sample

    def update(self, info: TensorInfo, delta: Tensor, state: State, ctx: FoldContext) -> None:
        self.inner.update(info, self.chain._pre(info, delta, ctx), state, ctx)

    def update_chunk(
        self, info: TensorInfo, delta: np.ndarray, state: Arrays, ctx: FoldContext, start: int
    ) -> None:
        for step in self.chain.pre:
            step.transform_into(info, delta, ctx, start)  # delta is the engine's scratch
        self.inner.update_chunk(info, delta, state, ctx, start)

    def finish(self, ctx: FoldContext) -> None:
        self.inner.finish(ctx)


def chain(*parts: Preprocessor | Strategy) -> Chain:
    return Chain(*parts)
