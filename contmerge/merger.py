"""The Merger: fold checkpoints one at a time into a running merged state, emit at any moment.

Memory while folding the t-th model is the same as while folding the 2nd: one tensor of the
base, of the arrival, and of the state (old and new) at a time; the state itself lives in a
durable directory (or in memory when no directory is given). A fold either commits entirely or
leaves the previous state untouched: validation failures, NaNs, a new state that would not be
finite, crashes, a full disk.

Speed: elementwise rules fold in 1 MiB chunks on a few threads (``contmerge.elementwise``), and
so do their passes; other rules get whole tensors and their reference ``fold``, several tensors
at once when the rule declares ``per_tensor_parallel`` (``contmerge.parallel_folds``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import shutil
import statistics
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .atomic import atomic_write_bytes, fsync_dir, writing
from .chunks import ChunkRunner
from .dirlock import DirectoryLock
from .dtypes import arrival_dtype_problem, dtype_summary, parse_out_dtype
from .elementwise import ElementwiseBatch, ElementwiseSweep, flat_base
from .emitting import (
    MODEL_CARD,
    check_out,
    model_card,
    out_metas,
    plan_shards,
    set_config_dtype,
    write_model,
)
from .errors import (
    CheckpointError,
    ContmergeError,
    IgnoredTensorWarning,
    Notice,
    SettingError,
    StateError,
)
from .hashing import ContentHash, tensor_leaves
from .identity import base_identity, file_identity
from .kernels import all_finite, sum_sq
from .layout import tensor_infos
from .limits import DEFAULT_MAX_RELATIVE_DELTA
from .manifest import FORMAT, MANIFEST, read_manifest
from .parallel_folds import ParallelFolds
from .registry import parse_strategy
from .sources import CONFIG_FILES_TO_SKIP, Checkpoint, open_checkpoint
from .state import DiskStore, MemoryStore, slot_key
from .strategy import FoldContext, Pass, State, Strategy, TensorInfo
from .tensorfile import CODE_BY_DTYPE, TensorMeta
from .threads import resolve_threads, torch_threads

Source = str | Path | Mapping[str, torch.Tensor] | nn.Module | Checkpoint
#: what the content hash takes of one tensor: dtype, shape and its leaves' digests
_Hashed = tuple[torch.dtype, tuple[int, ...], list[bytes]]
#: a base up to this size stays mapped between folds (its pages are in the page cache anyway;
#: mapping them again for every fold costs a fault per 64 KiB); a larger one is let go tensor by
#: tensor, so resident memory stays bounded for models larger than RAM
MAPPED_BASE_LIMIT = 1 << 30
#: why a fold from finite inputs is refused when the new state it computes is not finite
STATE_OVERFLOW = (
    "folding it would make the merged state Inf or NaN (it overflows the float range); "
    "refused, the state is unchanged"
)


@dataclass(frozen=True)
class FoldResult:
    status: str  # "folded" or "duplicate"
    index: int  # position among folded arrivals (of the earlier fold, for a duplicate)
    content_hash: str
    source: str
    seconds: float
    #: what was folded but deserves a look (also issued as ``IgnoredTensorWarning``)
    warnings: tuple[str, ...] = ()


class Merger:
    """Fold checkpoints of one base into a merged model with a named strategy.

    ``Merger(base, "opcm", state_dir="run/")`` creates the state, or resumes it when it exists
    (then ``strategy`` may be omitted, and must match if given). ``state_dir=None`` keeps the
    state in memory. With ``dedupe`` (the default) a checkpoint whose content was folded before
    is skipped; turn it off where identical arrivals must each count (a federated round in
    which two clients return the same model). ``threads`` bounds the compute threads of a fold
    or emit (``contmerge.threads``): that many threads fold the chunks of each tensor for
    elementwise rules, and whole tensors at once for rules whose per-tensor work is heavy
    (OPCM), torch single-threaded in each; other work gets torch's pool of that many threads,
    set for the fold only (default: ``$CONTMERGE_THREADS``, else ``$OMP_NUM_THREADS``, else one
    per usable core, at most 4). ``workers`` is its older name. ``keep_base_mapped``
    keeps the base's pages mapped between folds (default: when it is at most 1 GiB).
    ``device`` (a torch device, e.g. "cuda") is where rules do their heavy per-tensor work
    (OPCM's SVDs and products); the state stays in CPU memory or on disk.
    ``read_only`` opens an existing state to emit it, sharing its lock with other readers and
    writing nothing in its directory (it works on a read-only file system); it cannot fold.
    Resuming a state, a base whose files are unchanged since the state last read it (path,
    size, mtime, inode, safetensors headers) is not read again: its fingerprint, linear weights
    and norms come from the state's record; ``verify_base`` reads and fingerprints it anyway.
    """

    def __init__(
        self,
        base: Source,
        strategy: str | Strategy | None = None,
        state_dir: str | Path | None = None,
        *,
        linear: str | None = None,
        max_relative_delta: float | None = DEFAULT_MAX_RELATIVE_DELTA,
        dedupe: bool = True,
        progress: bool = False,
        threads: int | None = None,
        workers: int | None = None,
        keep_base_mapped: bool | None = None,
        device: str | torch.device | None = None,
        read_only: bool = False,
        verify_base: bool = False,
        **hparams: Any,
    ) -> None:
        self.device = _compute_device(device)
        self.threads = resolve_threads(threads, workers)
        self.base = open_checkpoint(base)
        # a path is recorded absolute: the state may be emitted from any directory
        self._base_source = os.path.abspath(base) if isinstance(base, (str, Path)) else None
        self._runner = ChunkRunner(self.threads)
        if keep_base_mapped is None:
            keep_base_mapped = sum(m.nbytes for m in self.base.meta.values()) <= MAPPED_BASE_LIMIT
        self._keep_base_mapped = keep_base_mapped
        # the base's tensors as batches take them, while the base stays mapped
        self._base_views: dict[str, tuple[torch.Tensor, np.ndarray | None]] = {}
        self._base_identity = base_identity(base)
        self.verify_base = verify_base
        self.max_relative_delta = max_relative_delta
        self.dedupe = dedupe
        self.progress = progress
        self._float_names = [n for n, m in self.base.meta.items() if m.is_float]
        self.read_only = read_only
        directory = Path(state_dir) if state_dir is not None else None
        if directory is not None and not read_only:
            try:
                _check_new_state(directory, strategy, hparams, linear)
            except BaseException:
                self._runner.close()
                raise
        if directory is None:
            self.infos = tensor_infos(self.base, linear)
            if read_only:
                raise StateError("read_only needs the state_dir of an existing state")
            self.strategy = self._new_strategy(strategy, hparams)
            initial = _LazyInit(self.strategy, self.infos, self._float_names)
            self.store: MemoryStore | DiskStore = MemoryStore(
                self._new_manifest(linear), dict(initial.items())
            )
            return
        # a writer locks the directory before looking for a manifest: finding none and creating
        # the state must be one step, or two processes could each create it over the other
        lock = None if read_only else DirectoryLock.exclusive(directory)
        if lock is not None and strategy is not None:
            try:
                self._take_over_if_empty(directory, strategy, hparams, linear)
            except BaseException:
                lock.close()
                self._runner.close()
                raise
        if lock is not None and not os.path.lexists(directory / MANIFEST):
            try:
                # the layout of a resumed state comes from its record of the base (_resume)
                self.infos = tensor_infos(self.base, linear)
                self.strategy = self._new_strategy(strategy, hparams)
                initial = _LazyInit(self.strategy, self.infos, self._float_names)
                manifest = self._new_manifest(linear)
            except BaseException:
                lock.close()
                self._runner.close()
                raise
            try:
                # built one tensor at a time while written: a whole zero state would be as
                # large as the model, which must not need to fit in memory
                metas = self._slot_metas()
                self.store = DiskStore.create(directory, lock, manifest, initial, metas)
            except BaseException:
                self._runner.close()  # the store released the lock
                raise
            return
        try:
            self.store = DiskStore.open(directory, lock=lock, read_only=read_only)
        except BaseException:
            self._runner.close()
            raise
        try:
            self.strategy = self._resume(strategy, hparams, linear)
        except BaseException:
            self.store.close()  # release the directory's lock at once, not at collection
            self._runner.close()
            raise

    # --- setup ----------------------------------------------------------------------------
    def _take_over_if_empty(
        self, directory: Path, strategy: str | Strategy, hparams: dict[str, Any], linear: str | None
    ) -> None:
        """A state that has folded nothing (its first fold failed) is no one's yet: asked for
        with another strategy or linear pattern, it is removed so that a new one is created.
        Called with the directory's writer lock held."""
        if not os.path.lexists(directory / MANIFEST):
            return
        manifest = read_manifest(directory)[0]
        if manifest["globals"]["count"] != 0 or manifest["generation"] != 0:
            return
        wanted = parse_strategy(strategy, **hparams).spec()
        if wanted == manifest["strategy"] and linear == manifest.get("linear_pattern"):
            return
        # the manifest goes first: its generation-0 file is then a leftover the creation clears
        with writing(directory / MANIFEST):
            os.unlink(directory / MANIFEST)
            fsync_dir(directory)
        warnings.warn(
            f"{directory}: the state had folded nothing yet ({manifest['strategy']}); "
            f"starting it anew with {wanted}",
            Notice,
            stacklevel=3,
        )

    def _new_strategy(self, strategy: str | Strategy | None, hparams: dict[str, Any]) -> Strategy:
        if strategy is None:
            raise StateError("a strategy is needed to start a new merge state")
        return parse_strategy(strategy, **hparams)

    def _new_manifest(self, linear: str | None) -> dict[str, Any]:
        fingerprint = self._fingerprint_base()
        return {
            "format": FORMAT,
            "strategy": self.strategy.spec(),
            "linear_pattern": linear,
            "base": {
                "source": self._base_source or self.base.source,
                "fingerprint": fingerprint,
                "tensors": len(self.infos),
                "linear_weights": sum(i.is_linear for i in self.infos.values()),
                **self._base_record(),
            },
            "globals": {**self.strategy.init_globals(), "count": 0},
            "arrivals": [],
            "generation": 0,
            "created": _now(),
        }

    def _resume(
        self, strategy: str | Strategy | None, hparams: dict[str, Any], linear: str | None
    ) -> Strategy:
        manifest = self.store.manifest
        saved = parse_strategy(manifest["strategy"])
        if strategy is not None:
            wanted = parse_strategy(strategy, **hparams)
            if wanted.spec() != saved.spec():
                raise StateError(
                    f"{self.store.path}: state was made with {saved.spec()}, not {wanted.spec()}"
                )
        pattern = manifest.get("linear_pattern")
        recorded = manifest["base"]
        record = None if self.verify_base else self._recorded_base(recorded)
        if record is not None:  # the very base the state last read, unchanged
            self.infos = tensor_infos(self.base, pattern, record["linear"])
            self._base_sq = dict(record["sum_sq"])
        else:
            self.infos = tensor_infos(self.base, pattern)
            fingerprint = self._fingerprint_base()
            if fingerprint != recorded["fingerprint"]:
                raise StateError(
                    f"{self.store.path}: base {self.base.source} is not the base this state was "
                    f"started from ({recorded['source']}): its fingerprint is {fingerprint[:16]}…, "
                    f"the state's {recorded['fingerprint'][:16]}… (give --base the base it was "
                    "started from)"
                )
            if not self.read_only:  # recorded by the next commit
                manifest["base"] = {**recorded, **self._base_record()}
        assert isinstance(self.store, DiskStore)
        if self.store.slot_metas != self._slot_metas(saved):
            raise StateError(
                f"{self.store.path}/{manifest['state_file']}: its state tensors are not those "
                f"{saved.spec()} keeps for this base; nothing was changed"
            )
        return saved

    def _base_record(self) -> dict[str, Any]:
        """What a later open of this unchanged base takes instead of reading it (``record``);
        nothing for a base that is not files, or whose norms JSON cannot hold."""
        if self._base_identity is None or not all(map(math.isfinite, self._base_sq.values())):
            return {}
        linear = sorted(n for n, i in self.infos.items() if i.is_linear)
        return {
            "record": {"identity": self._base_identity, "linear": linear, "sum_sq": self._base_sq}
        }

    def _recorded_base(self, base: Mapping[str, Any]) -> dict[str, Any] | None:
        """The state's record of its base if it is of this base's files as they are now, and
        well formed (a hand-edited or older manifest has none: the base is read)."""
        record = base.get("record")
        if self._base_identity is None or not isinstance(record, dict):
            return None
        linear, sum_sq = record.get("linear"), record.get("sum_sq")
        if (
            record.get("identity") != self._base_identity
            or not isinstance(linear, list)
            or not all(isinstance(n, str) for n in linear)
            or not isinstance(sum_sq, dict)
            or sum_sq.keys() != set(self._float_names)
            or not all(type(v) in (int, float) for v in sum_sq.values())
        ):
            return None
        return record

    def _fingerprint_base(self) -> str:
        """Hash of the base; also keeps ‖θ0‖² (fixed for the base) for the relative-delta check."""
        content = ContentHash()
        self._base_sq: dict[str, float] = {}
        for name, info in self.infos.items():
            tensor = self.base.view(name)
            content.add_tensor(name, tensor)
            if info.meta.is_float:
                self._base_sq[name] = _sum_sq(tensor.to(info.compute_dtype))
            del tensor
            self._release_base(name)
        return content.hexdigest()

    def _slot_metas(self, strategy: Strategy | None = None) -> dict[str, TensorMeta]:
        strategy = strategy or self.strategy
        return {
            slot_key(name, slot): meta
            for name in self._float_names
            for slot, meta in strategy.slots(self.infos[name]).items()
        }

    # --- inspection -----------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        return self.store.manifest

    @property
    def count(self) -> int:
        return int(self.manifest["globals"]["count"])

    @property
    def arrivals(self) -> list[dict[str, Any]]:
        return list(self.manifest["arrivals"])

    # --- folding --------------------------------------------------------------------------
    def fold(
        self,
        source: Source,
        *,
        extras: Mapping[str, Source] | None = None,
        name: str | None = None,
        weight: float | None = None,
    ) -> FoldResult:
        """Fold one checkpoint. Raises CheckpointError (state untouched) if it does not fit.

        ``weight`` (finite, > 0; rules with ``takes_weight``: average, task_arithmetic) weighs
        this arrival against the others; it is recorded in the manifest."""
        if self.read_only:
            raise StateError(f"{self.store.path}: opened read-only; cannot fold")
        check_weight(self.strategy, weight)
        with torch_threads(self.threads):  # the fold's own: the caller's is restored
            return self._fold(source, extras, name, weight)

    def _fold(
        self,
        source: Source,
        extras: Mapping[str, Source] | None,
        name: str | None,
        weight: float | None,
    ) -> FoldResult:
        started = time.perf_counter()
        identity = file_identity(source) if self.dedupe else None
        known = self._known_file(identity, name or str(source), started)
        if known is not None:
            return known
        arrival = open_checkpoint(source, self.base.meta)
        label = name or arrival.source
        try:
            opened_extras = self._open_extras(source, extras, label)
        except BaseException:
            arrival.close()
            raise
        try:
            self._check_layout(arrival)
            ctx = self._context(self.count + 1, opened_extras, weight)
            for sweep in self.strategy.passes(ctx):
                if sweep.elementwise:
                    self._sweep_chunks(arrival, sweep, ctx)
                else:
                    for info, delta, _, _ in self._deltas(arrival, "pass"):
                        sweep.update(info, delta, self.store.read(info.name), ctx)
                sweep.finish(ctx)
            recorded = name or _recorded_source(source, arrival)
            return self._fold_pass(arrival, ctx, (label, recorded), identity, started, weight)
        finally:
            arrival.close()
            for extra in opened_extras.values():
                extra.close()

    def _known_file(self, identity: str | None, label: str, started: float) -> FoldResult | None:
        """The very same file, unchanged, was folded before: its result, with no reading."""
        for record in self.manifest["arrivals"] if identity is not None else ():
            if record.get("file") == identity:
                seconds = time.perf_counter() - started
                return FoldResult("duplicate", record["index"], record["hash"], label, seconds)
        return None

    def _context(
        self,
        index: int,
        extras: dict[str, Checkpoint] | None = None,
        weight: float | None = None,
    ) -> FoldContext:
        return FoldContext(
            index=index,
            globals=dict(self.manifest["globals"]),
            extras=extras or {},
            numel=sum(self.infos[n].meta.numel for n in self._float_names),
            float64=any(self.infos[n].compute_dtype == torch.float64 for n in self._float_names),
            weight=1.0 if weight is None else float(weight),
            device=self.device,
        )

    def _sweep_chunks(self, arrival: Checkpoint, sweep: Pass, ctx: FoldContext) -> None:
        """An elementwise pass: chunked on the fold threads where the fold would be chunked."""
        batch = ElementwiseSweep(sweep, self._runner, ctx)

        def run() -> None:
            for name in batch.run():
                arrival.release(name)
                self._release_base(name)
                self.store.release(name)

        for name in self._float_names:
            info = self.infos[name]
            if self._chunkable(arrival, name):
                batch.add(
                    info,
                    arrival.meta[name].dtype,
                    arrival.chunks(name),
                    self._base_view(info),
                    self.store.view(name),
                )
                if batch.full:
                    run()
            else:  # e.g. an adapter's δ, computed whole
                delta, _, _ = self._delta_of(arrival, info, None)
                sweep.update(info, delta, self.store.read(name), ctx)
        run()

    def _fold_pass(
        self,
        arrival: Checkpoint,
        ctx: FoldContext,
        labels: tuple[str, str],
        identity: str | None,
        started: float,
        weight: float | None,
    ) -> FoldResult:
        """``labels``: the arrival as shown (typed) and as recorded (absolute)."""
        label, recorded = labels
        staging = self.store.begin(self._slot_metas())
        ignored: list[str] = []
        try:
            hashed, sums = self._fold_tensors(arrival, ctx, staging, label, ignored)
            record = self._record(
                arrival, label, identity, hashed, sums, self.manifest["arrivals"], weight, recorded
            )
            if isinstance(record, FoldResult):
                staging.abort()
                return dataclasses.replace(record, seconds=time.perf_counter() - started)
            seconds = time.perf_counter() - started
            self.store.commit(staging, self._next_manifest(ctx, record, seconds))
        except BaseException:
            staging.abort()
            raise
        return self._folded(ctx.index, record, ignored, started, label)

    def _record(
        self,
        arrival: Checkpoint,
        label: str,
        identity: str | None,
        hashed: dict[str, _Hashed],
        sums: dict[str, float],
        earlier: list[dict[str, Any]],
        weight: float | None = None,
        recorded: str | None = None,
    ) -> dict[str, Any] | FoldResult:
        """The manifest's record of a folded arrival (its source ``recorded``, default
        ``label``); a duplicate's result when one of the ``earlier`` records has its content
        hash; CheckpointError if it moved too far."""
        content = ContentHash()
        for name in self.infos:
            if name in hashed:
                content.add(name, *hashed[name])
        content_hash = content.hexdigest()
        for record in earlier if self.dedupe else ():
            if record["hash"] == content_hash:
                return FoldResult("duplicate", record["index"], content_hash, label, 0.0)
        delta_sq = math.fsum(sums.values())
        # over the matrices the arrival changes: all of a full model's, an adapter's targets
        matrix_ratios = [
            math.sqrt(sums[n] / self._base_sq[n])
            for n in sums
            if n in arrival.meta and len(self.infos[n].shape) >= 2 and self._base_sq[n] > 0
        ]
        base_sq = sum(self._base_sq.values())
        relative = math.sqrt(delta_sq / base_sq) if base_sq > 0 else 0.0
        moved = statistics.median(matrix_ratios) if matrix_ratios else 0.0
        limit = self.max_relative_delta
        if limit is not None and moved > limit:
            raise CheckpointError(
                label,
                f"differs from the base by {moved:.2f}× the norm of its weight matrices "
                f"(median over the matrices it changes; limit {limit}): it looks fine-tuned "
                "from another base"
                + ("" if arrival.carries_full_weights else ", or scaled absurdly (lora_alpha)")
                + " (if it is a fine-tune of this one, allow it with --any-base or a larger "
                "--max-relative-delta; in Python max_relative_delta=None)",
            )
        return {
            "hash": content_hash,
            "source": recorded or label,
            "file": identity,
            "relative_delta": round(relative, 6),
            "median_matrix_delta": round(moved, 6),
            "dtype": dtype_summary(arrival.meta.values()),
            **({} if weight is None else {"weight": float(weight)}),
        }

    def _folded(
        self, index: int, record: dict[str, Any], ignored: list[str], started: float, label: str
    ) -> FoldResult:
        notes = tuple(
            f"{label}: tensor {name!r} differs from the base but is not merged (integer "
            "tensors are not merged; the base's value is emitted)"
            for name in ignored
        )
        for note in notes:
            warnings.warn(note, IgnoredTensorWarning, stacklevel=4)
        seconds = time.perf_counter() - started
        return FoldResult("folded", index, record["hash"], label, seconds, notes)

    def _fold_tensors(
        self, arrival: Checkpoint, ctx: FoldContext, staging: Any, label: str, ignored: list[str]
    ) -> tuple[dict[str, _Hashed], dict[str, float]]:
        """Fold every tensor into ``staging``; their hash leaves and ‖θ_t − θ0‖² by name. The
        names of integer tensors that differ from the base (not merged) go to ``ignored``."""
        hashed: dict[str, _Hashed] = {}
        sums: dict[str, float] = {}
        batch = ElementwiseBatch(self.strategy, self._runner, ctx)

        def write_finite(name: str, new: State) -> None:
            if not _all_finite(new):  # δ was finite: the fold overflowed
                raise CheckpointError(arrival.source, STATE_OVERFLOW, name)
            staging.write(name, new)

        # whole-tensor folds on several threads, handed on in order (None: one at a time here)
        whole = (
            ParallelFolds(self.strategy, ctx, self._runner.workers, write_finite)
            if self.strategy.per_tensor_parallel and self._runner.workers > 1
            else None
        )
        desc = f"fold {Path(label).name}"
        with (
            tqdm(
                total=len(self.infos),
                desc=desc,
                unit="tensor",
                disable=not self.progress,
                leave=False,
            ) as bar,
            whole or contextlib.nullcontext(),
        ):
            for info in self.infos.values():
                if not info.meta.is_float:
                    self._integer_tensor(arrival, info, hashed, ignored)
                    bar.update()
                elif self._chunkable(arrival, info.name):
                    if whole is not None:
                        whole.drain()  # keep order
                    batch.add(
                        info,
                        arrival.meta[info.name].dtype,
                        arrival.chunks(info.name),
                        self._base_view(info),
                        self.store.view(info.name),
                        staging.target(info.name),
                    )
                    if batch.full:
                        self._fold_batch(batch, arrival, staging, hashed, sums, bar)
                else:
                    self._fold_batch(batch, arrival, staging, hashed, sums, bar)  # keep order
                    delta, base, sums[info.name] = self._delta_of(arrival, info, hashed)
                    state = self.store.read(info.name)
                    if whole is None:
                        write_finite(info.name, self.strategy.fold(info, state, delta, base, ctx))
                    else:
                        whole.submit(info, state, delta, base)
                    bar.update()
            if whole is not None:
                whole.drain()
            self._fold_batch(batch, arrival, staging, hashed, sums, bar)
        return hashed, sums

    def _integer_tensor(
        self, arrival: Checkpoint, info: TensorInfo, hashed: dict[str, _Hashed], ignored: list[str]
    ) -> None:
        """Not merged, but part of the arrival's content; noted when it differs from the base."""
        if arrival.carries_full_weights and info.name in arrival.meta:
            value = arrival.read(info.name)
            hashed[info.name] = _hashed(value)
            if not torch.equal(value, self.base.view(info.name)):
                ignored.append(info.name)
            self._release_base(info.name)

    # --- group commit ---------------------------------------------------------------------
    def fold_group(self, sources: Sequence[Source]) -> list[FoldResult] | None:
        """Fold several checkpoints in one pass over the state and commit once, with the
        outcome of folding them one by one in that order: each is recorded with its own index,
        hash and file, a file folded before is skipped, and a crash leaves the last committed
        generation. Elementwise rules without passes, full checkpoints only. None, with nothing
        changed, when the group does not qualify or any arrival would be refused or skipped as a
        duplicate of content: ``fold`` them one at a time then (it says why)."""
        if self.read_only:
            raise StateError(f"{self.store.path}: opened read-only; cannot fold")
        started = time.perf_counter()
        results: dict[int, FoldResult] = {}
        todo: list[tuple[int, str | None]] = []
        for position, source in enumerate(sources):
            identity = file_identity(source) if self.dedupe else None
            known = self._known_file(identity, str(source), started)
            if known is not None:
                results[position] = known
            else:
                todo.append((position, identity))
        if len(todo) < 2 or not self._groupable(len(todo)):
            return None
        arrivals: list[Checkpoint] = []
        try:
            for position, _ in todo:
                arrivals.append(open_checkpoint(sources[position], self.base.meta))
                self._check_layout(arrivals[-1])
            if not all(a.carries_full_weights for a in arrivals):
                return None
            with torch_threads(self.threads):
                folded = self._commit_group(arrivals, [identity for _, identity in todo])
        except ContmergeError:  # one by one, the same arrival is refused and says why
            return None
        finally:
            for arrival in arrivals:
                arrival.close()
        if folded is None:
            return None
        for (position, _), arrival, (index, record, ignored) in zip(todo, arrivals, folded):
            results[position] = self._folded(index, record, ignored, started, arrival.source)
        return [results[p] for p in range(len(sources))]

    def _groupable(self, arrivals: int) -> bool:
        indices = range(self.count + 1, self.count + 1 + arrivals)
        return (
            self.strategy.elementwise
            and not self.strategy.needs_extras
            and not any(any(True for _ in self.strategy.passes(self._context(i))) for i in indices)
        )

    def _commit_group(
        self, arrivals: list[Checkpoint], identities: list[str | None]
    ) -> list[tuple[int, dict[str, Any], list[str]]] | None:
        started = time.perf_counter()
        ctxs = []
        globals_ = dict(self.manifest["globals"])
        for j in range(len(arrivals)):  # each sees the globals as if folded alone, in order
            ctx = self._context(self.count + 1 + j)
            ctx.globals = {**globals_, "count": ctx.index - 1}
            # an elementwise rule's end_fold reads no statistics of the fold (its threads
            # gather none), so the globals can be chained before the tensors are folded
            globals_ = self.strategy.end_fold(ctx.globals, ctx)
            ctxs.append(ctx)
        staging = self.store.begin(self._slot_metas())
        try:
            folded = self._fold_group_tensors(arrivals, ctxs, staging)
            earlier = list(self.manifest["arrivals"])
            records = []
            for arrival, identity, (hashed, sums, _) in zip(arrivals, identities, folded):
                recorded = _recorded_source(arrival.source, arrival)
                record = self._record(
                    arrival, arrival.source, identity, hashed, sums, earlier, recorded=recorded
                )
                if isinstance(record, FoldResult):
                    staging.abort()
                    return None
                earlier.append({"hash": record["hash"], "index": 0})
                records.append(record)
            manifest = self.manifest
            seconds = (time.perf_counter() - started) / len(arrivals)
            for ctx, record in zip(ctxs, records):
                manifest = self._next_manifest(ctx, record, seconds, manifest)
            manifest["generation"] = int(self.manifest["generation"]) + 1  # one commit
            self.store.commit(staging, manifest)
        except BaseException:
            staging.abort()
            raise
        return [(ctx.index, r, f[2]) for ctx, r, f in zip(ctxs, records, folded)]

    def _fold_group_tensors(
        self, arrivals: list[Checkpoint], ctxs: list[FoldContext], staging: Any
    ) -> list[tuple[dict[str, _Hashed], dict[str, float], list[str]]]:
        """Each batch of tensors folded by every arrival in turn: arrival j's new state is
        arrival j+1's old one, in two spare buffers used in turn; the last goes to ``staging``."""
        last = len(arrivals) - 1
        batches = [ElementwiseBatch(self.strategy, self._runner, ctx) for ctx in ctxs]
        out: list[tuple[dict[str, _Hashed], dict[str, float], list[str]]] = [
            ({}, {}, []) for _ in arrivals
        ]

        def run() -> None:
            names = [t.info.name for t in batches[0].tensors]
            for j, (batch, arrival) in enumerate(zip(batches, arrivals)):
                try:
                    folded = batch.run()
                finally:
                    for name in names:
                        arrival.release(name)
                for one in folded:
                    name = one.info.name
                    if not math.isfinite(one.sum_sq):  # one by one, fold names the reason
                        raise CheckpointError(arrival.source, "not finite", name)
                    out[j][0][name] = (arrival.meta[name].dtype, one.info.shape, one.leaves)
                    out[j][1][name] = one.sum_sq
                    if j == last:
                        staging.write(name, one.target)
            for name in names:
                self._release_base(name)
                self.store.release(name)

        for info in self.infos.values():
            if not info.meta.is_float:
                for arrival, (hashed, _, ignored) in zip(arrivals, out):
                    self._integer_tensor(arrival, info, hashed, ignored)
                continue
            target = staging.target(info.name)
            spares = [{k: torch.empty_like(v) for k, v in target.items()} for _ in range(2)]
            old = self.store.view(info.name)
            for j, (batch, arrival) in enumerate(zip(batches, arrivals)):
                new = target if j == last else spares[j % 2]
                dtype = arrival.meta[info.name].dtype
                batch.add(info, dtype, arrival.chunks(info.name), self._base_view(info), old, new)
                old = new
            if batches[0].full:
                run()
        run()
        return out

    def _next_manifest(
        self,
        ctx: FoldContext,
        record: dict[str, Any],
        seconds: float,
        after: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The manifest with ``record`` folded after ``after`` (default: the current one)."""
        manifest = dict(self.manifest if after is None else after)
        new_globals = self.strategy.end_fold(ctx.globals, ctx)
        new_globals["count"] = ctx.index
        manifest["globals"] = new_globals
        arrival = {"index": ctx.index, **record, "folded_at": _now(), "seconds": round(seconds, 4)}
        manifest["arrivals"] = [*manifest["arrivals"], arrival]
        manifest["generation"] = int(manifest["generation"]) + 1
        return manifest

    def _check_layout(self, arrival: Checkpoint) -> None:
        """Names, shapes and dtypes against the base, from headers only (no tensor data)."""
        if arrival.carries_full_weights:
            # integer buffers are not merged (the base's are emitted), and transformers no
            # longer saves non-persistent ones such as BERT's ``position_ids``: only floats count
            missing = [n for n in self._float_names if n not in arrival.meta]
            if missing:
                raise CheckpointError(
                    arrival.source, f"{len(missing)} tensor(s) of the base are missing", missing[0]
                )
        extra = [n for n in arrival.meta if n not in self.infos]
        if extra:
            raise CheckpointError(
                arrival.source, f"{len(extra)} tensor(s) the base does not have", extra[0]
            )
        for name, meta in arrival.meta.items():
            want = self.infos[name].meta
            if meta.shape != want.shape:
                raise CheckpointError(
                    arrival.source,
                    f"shape {list(meta.shape)}, the base has {list(want.shape)}",
                    name,
                )
            problem = arrival_dtype_problem(meta.dtype, want.dtype, self.infos[name].compute_dtype)
            if problem:
                raise CheckpointError(arrival.source, problem, name)

    def _chunkable(self, arrival: Checkpoint, name: str) -> bool:
        return (
            self.strategy.elementwise
            and arrival.carries_full_weights
            and name in arrival.meta
            and not self.strategy.needs_extras
        )

    def _fold_batch(
        self,
        batch: ElementwiseBatch,
        arrival: Checkpoint,
        staging: Any,
        hashed: dict[str, _Hashed],
        sums: dict[str, float],
        bar: Any,
    ) -> None:
        """Fold the tensors gathered in ``batch`` and hand their new state to ``staging``."""
        if not batch.tensors:
            return
        names = [t.info.name for t in batch.tensors]
        try:
            folded = batch.run()
        finally:
            for name in names:
                arrival.release(name)
                self._release_base(name)
                self.store.release(name)
        for one in folded:
            name = one.info.name
            if not math.isfinite(one.sum_sq):
                why = self._why_not_finite(arrival, name, one.target)
                raise CheckpointError(arrival.source, why, name)
            hashed[name] = (arrival.meta[name].dtype, one.info.shape, one.leaves)
            sums[name] = one.sum_sq
            staging.write(name, one.target)
        bar.update(len(folded))

    def _base_view(self, info: TensorInfo) -> tuple[torch.Tensor, np.ndarray | None]:
        """The base's tensor in place, as batches take it (``flat_base``)."""
        if not self._keep_base_mapped:
            return flat_base(info, self.base.view(info.name))
        view = self._base_views.get(info.name)
        if view is None:
            view = self._base_views[info.name] = flat_base(info, self.base.view(info.name))
        return view

    def _release_base(self, name: str) -> None:
        if not self._keep_base_mapped:
            self.base.release(name)

    def _delta_of(
        self,
        arrival: Checkpoint,
        info: TensorInfo,
        hashed: dict[str, _Hashed] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(θ_t − θ0, θ0, ‖θ_t − θ0‖²) of one float tensor, in compute dtype, checked finite;
        the arrival's own tensor (or a LoRA adapter's delta) is hashed into ``hashed``."""
        name = info.name
        # a LoRA adapter's tensors are factors or replacements: ask it for the delta
        full = arrival.carries_full_weights and name in arrival.meta
        base = self.base.read(name).to(info.compute_dtype)
        if full:
            value = arrival.read(name)
            if hashed is not None:
                hashed[name] = _hashed(value)
            delta = value.to(info.compute_dtype)
            if delta is value and not arrival.fresh_reads:
                delta = delta - base  # the caller's own tensor: never write into it
            else:
                delta.sub_(base)
        else:
            lowrank = arrival.delta(name, base)
            delta = torch.zeros_like(base) if lowrank is None else lowrank
            if hashed is not None:
                hashed[name] = _hashed(delta)
        sq = _sum_sq(delta)
        if not math.isfinite(sq):
            raise CheckpointError(arrival.source, self._why_not_finite(arrival, name), name)
        return delta, base, sq

    def _deltas(
        self, arrival: Checkpoint, label: str
    ) -> Iterator[tuple[TensorInfo, torch.Tensor, torch.Tensor, float]]:
        """(info, θ_t − θ0, θ0, ‖θ_t − θ0‖²) per float tensor, for a strategy's passes."""
        bar = tqdm(
            self._float_names, desc=label, unit="tensor", disable=not self.progress, leave=False
        )
        for name in bar:
            info = self.infos[name]
            yield (info, *self._delta_of(arrival, info, None))

    def _why_not_finite(
        self, arrival: Checkpoint, name: str, new_state: State | None = None
    ) -> str:
        """Why a sum over δ (and the new state, when given) came out NaN or Inf."""
        if not arrival.carries_full_weights or name not in arrival.meta:
            return "adapter delta has NaN or Inf"
        # δ was computed in place: read the tensor again to tell a bad value from an overflow
        compute = self.infos[name].compute_dtype
        value = arrival.read(name).to(compute)
        if not bool(value.isfinite().all()):  # checked in compute dtype: f8 has no isfinite
            return "contains NaN or Inf"
        delta = value - self.base.read(name).to(compute)
        if bool(delta.isfinite().all()) and new_state is not None and not _all_finite(new_state):
            return STATE_OVERFLOW
        return "differs from the base by more than the float range (δ overflows)"

    def _open_extras(
        self, source: Source, extras: Mapping[str, Source] | None, label: str
    ) -> dict[str, Checkpoint]:
        """The arrival's statistics by kind: given, or its sidecar file. Missing ones are
        refused here, before anything is read or the state touched."""
        opened: dict[str, Checkpoint] = {}
        try:
            for kind in self.strategy.needs_extras:
                given = (extras or {}).get(kind)
                sidecar = _sidecar(Path(source), kind) if isinstance(source, (str, Path)) else None
                if given is None and sidecar is not None and sidecar.exists():
                    given = sidecar
                if given is None:
                    raise CheckpointError(label, _no_statistics(self.strategy, kind, sidecar))
                opened[kind] = open_checkpoint(given)
        except BaseException:
            for checkpoint in opened.values():
                checkpoint.close()
            raise
        return opened

    # --- emitting -------------------------------------------------------------------------
    def iter_merged(
        self, out_dtype: str | torch.dtype | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The merged model, one tensor at a time, in the base's order, its float tensors in
        ``out_dtype`` (default: the base's dtypes; see ``contmerge.dtypes``). Raises
        StateError, after the last tensor at the latest, if a merged tensor is not finite or
        the state read does not match its checksum (``emit`` then writes nothing)."""
        dtype = parse_out_dtype(out_dtype)
        globals_ = self.manifest["globals"]
        self.store.begin_check()
        for name, info in self.infos.items():
            base = self.base.read(name)
            wanted = info.meta.dtype if dtype is None or not info.meta.is_float else dtype
            if not info.meta.is_float or self.count == 0:
                yield name, base.to(wanted)
                continue
            state = self.store.read(name)
            with torch_threads(self.threads):  # per tensor: the caller runs between yields
                merged = self.strategy.emit(info, state, base.to(info.compute_dtype), globals_)
            if self.store.holds(name, merged):
                merged = merged.clone()  # the store reuses state buffers: hand out a copy
            merged = merged.to(wanted)
            if not _all_finite({"merged": merged}):
                raise StateError(
                    f"{self._where()}: merged tensor {name!r} is Inf or NaN in "
                    f"{CODE_BY_DTYPE[wanted]} (the merge exceeds its range); "
                    "nothing was written"
                )
            yield name, merged
        self.store.end_check()

    def _where(self) -> str:
        return str(self.store.path) if self.store.path is not None else "merged state"

    def emit_state_dict(
        self, out_dtype: str | torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        return dict(self.iter_merged(out_dtype))

    def emit(
        self,
        out: str | Path,
        *,
        out_dtype: str | torch.dtype | None = None,
        shard_size: int | None = None,
    ) -> Path:
        """Write the merged model: a ``.safetensors`` file, or a model directory when ``out``
        has no ``.safetensors`` suffix: sharded like the base (or in files of at most
        ``shard_size`` bytes, with ``model.safetensors.index.json``), with the base's config
        and tokenizer files when the base was a model directory, and a model card
        ``README.md``. Float tensors are written in ``out_dtype``, default the base's."""
        out = Path(out)
        dtype = parse_out_dtype(out_dtype)
        check_out(out, shard_size)
        as_directory = out.suffix != ".safetensors"
        made = as_directory and not out.exists()
        metas = out_metas({name: info.meta for name, info in self.infos.items()}, dtype)
        metadata = {
            "format": "pt",
            "contmerge_strategy": self.strategy.spec(),
            "contmerge_count": str(self.count),
        }
        try:
            if as_directory:
                plan = plan_shards(metas, self.base.shard_names, shard_size)
                write_model(out, self.iter_merged(dtype), metas, plan, metadata)
            else:
                plan = {out.name: list(metas)}
                tensors = self.iter_merged(dtype)
                write_model(out.parent, tensors, metas, plan, metadata, model_directory=False)
        except BaseException:
            if made:  # leave no empty directory behind
                with contextlib.suppress(OSError):
                    out.rmdir()
            raise
        if as_directory:
            with writing(out):
                if self.base.config_dir is not None:
                    _copy_config(self.base.config_dir, out)
                    if dtype is not None:
                        set_config_dtype(out, dtype)
                card = model_card(self.manifest, _version(), dtype)
                atomic_write_bytes(out / MODEL_CARD, card.encode())
        return out

    def close(self) -> None:
        self._base_views.clear()  # before the base, so its map can close
        self.store.close()
        self.base.close()
        self._runner.close()

    def __enter__(self) -> Merger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _recorded_source(source: Source, arrival: Checkpoint) -> str:
    """An arrival's file as the manifest records it: absolute, so that the record still names
    it from another directory (as the base's path is); an in-memory one by its label."""
    return os.path.abspath(arrival.source) if isinstance(source, (str, Path)) else arrival.source


def check_weight(strategy: Strategy, weight: float | None) -> None:
    """SettingError unless ``weight`` is None, or a finite number > 0 for a rule that takes one."""
    if weight is None:
        return
    if not strategy.takes_weight:
        raise SettingError(
            f"{strategy.spec()} takes no per-arrival weight (average and "
            "task_arithmetic do); fold without one"
        )
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
        raise SettingError(f"weight {weight!r} must be a finite number > 0")


def _check_new_state(
    directory: Path, strategy: str | Strategy | None, hparams: dict[str, Any], linear: str | None
) -> None:
    """Refuse what would be refused once the state exists before its directory is made (a
    refused command must leave nothing behind): the strategy and its settings, the pattern."""
    if strategy is None and not os.path.lexists(directory):
        raise StateError(
            f"{directory}: no state there; a strategy is needed to start a new merge state"
        )
    if strategy is not None:
        parse_strategy(strategy, **hparams)
    if linear:
        try:
            re.compile(linear)
        except re.error as exc:
            raise SettingError(f"--linear {linear!r} is not a regular expression: {exc}") from None


class _LazyInit(Mapping[str, dict[str, torch.Tensor]]):
    """The strategy's initial state per tensor, created only when asked for."""

    def __init__(self, strategy: Strategy, infos: Mapping[str, TensorInfo], names: list[str]):
        self._strategy, self._infos, self._names = strategy, infos, names

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._infos:
            raise KeyError(name)
        return self._strategy.init(self._infos[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _compute_device(device: str | torch.device | None) -> torch.device | None:
    """The device asked for, checked to exist here (a clear error, before any work)."""
    if device is None:
        return None
    try:
        resolved = torch.device(device)
        if resolved.type == "meta":
            raise RuntimeError("the meta device holds no values")
        torch.empty(1, device=resolved)
    except (RuntimeError, AssertionError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ContmergeError(f"device {str(device)!r} cannot be used here: {reason}") from exc
    return resolved


def _sum_sq(tensor: torch.Tensor) -> float:
    """Σx² accumulated in float64 (compiled, one pass); NaN/Inf if any entry is."""
    if tensor.numel() == 0:
        return 0.0
    flat = tensor.reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.to(torch.float32)
    return float(sum_sq(flat.numpy()))


def _all_finite(state: State) -> bool:
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


def _hashed(tensor: torch.Tensor) -> _Hashed:
    return tensor.dtype, tuple(tensor.shape), tensor_leaves(tensor)


def _sidecar(path: Path, kind: str) -> Path:
    """``model.safetensors`` brings its ``kind`` statistics in ``model.<kind>.safetensors``."""
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(f"{stem}.{kind}.safetensors")


def _no_statistics(strategy: Strategy, kind: str, sidecar: Path | None) -> str:
    looked = (
        f"looked for its sidecar {sidecar} (none there)"
        if sidecar is not None
        else "an in-memory arrival has no sidecar file"
    )
    return (
        f"{strategy.spec()} needs {kind!r} statistics with each arrival; none were given and "
        f"{looked}: save them as <checkpoint>.{kind}.safetensors beside it (same tensor names "
        f"and shapes), or pass extras={{{kind!r}: ...}}"
    )


def _copy_config(source: Path, out: Path) -> None:
    for entry in source.iterdir():
        if entry.name in CONFIG_FILES_TO_SKIP or entry.suffix in (".safetensors", ".bin"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, out / entry.name, dirs_exist_ok=True)
        else:
            shutil.copy2(entry, out / entry.name)


def _version() -> str:
    from . import __version__  # the package's, set after this module is imported

    return __version__


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
