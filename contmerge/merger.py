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
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_write_bytes, fsync_dir, writing
from .base_tensors import MAPPED_BASE_LIMIT, BaseTensors
from .checks import check_layout, check_weight, state_finite
from .chunks import ChunkRunner
from .dirlock import DirectoryLock
from .dtypes import parse_out_dtype
from .emitting import (
    MODEL_CARD,
    check_out,
    model_card,
    out_metas,
    plan_shards,
    set_config_dtype,
    write_model,
)
from .errors import CheckpointError, ContmergeError, Notice, SettingError, StateError
from .fold_group import GroupRun, groupable
from .fold_run import FoldResult, FoldRun, folded_result, now
from .identity import base_identity, file_identity
from .layout import tensor_infos
from .limits import DEFAULT_MAX_RELATIVE_DELTA
from .manifest import MANIFEST, ArrivalRecord, BaseRecord, KnownBase, Manifest, read_manifest
from .registry import parse_strategy
from .sources import CONFIG_FILES_TO_SKIP, Checkpoint, open_checkpoint, sidecar_name
from .state import DiskStore, MemoryStore, slot_key
from .stores import Store
from .strategy import FoldContext, Strategy, TensorInfo
from .tensorfile import CODE_BY_DTYPE, TensorMeta
from .threads import resolve_threads, torch_threads

__all__ = ["DEFAULT_MAX_RELATIVE_DELTA", "MAPPED_BASE_LIMIT", "FoldResult", "Merger", "Source"]

Source = str | Path | Mapping[str, torch.Tensor] | nn.Module | Checkpoint


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
    ``settings`` are the strategy's hyper-parameters when ``strategy`` is a name (``--set``,
    e.g. ``settings={"alpha": 0.3}``; or in the spec itself, ``"opcm(alpha=0.3)"``).
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
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        # the strategy's hyper-parameters, apart from the Merger's own options
        hparams = dict(settings or {})
        self.device = _compute_device(device)
        self.threads = resolve_threads(threads, workers)
        self.base = open_checkpoint(base)
        # a path is recorded absolute: the state may be emitted from any directory
        self._base_source = os.path.abspath(base) if isinstance(base, (str, Path)) else None
        self.runner = ChunkRunner(self.threads)
        self.base_tensors = BaseTensors(self.base, keep_base_mapped)
        self._base_identity = base_identity(base)
        self.verify_base = verify_base
        self.max_relative_delta = max_relative_delta
        self.dedupe = dedupe
        self.progress = progress
        self._float_names = self.base_tensors.float_names
        self.read_only = read_only
        directory = Path(state_dir) if state_dir is not None else None
        if directory is not None and not read_only:
            try:
                _check_new_state(directory, strategy, hparams, linear)
            except BaseException:
                self.runner.close()
                raise
        if directory is None:
            self.infos = tensor_infos(self.base, linear)
            if read_only:
                raise StateError("read_only needs the state_dir of an existing state")
            self.strategy = self._new_strategy(strategy, hparams)
            initial = _LazyInit(self.strategy, self.infos, self._float_names)
            self.store: Store = MemoryStore(self._new_manifest(linear), dict(initial.items()))
            return
        # a writer locks the directory before looking for a manifest: finding none and creating
        # the state must be one step, or two processes could each create it over the other
        lock = None if read_only else DirectoryLock.exclusive(directory)
        if lock is not None and strategy is not None:
            try:
                self._take_over_if_empty(directory, strategy, hparams, linear)
            except BaseException:
                lock.close()
                self.runner.close()
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
                self.runner.close()
                raise
            try:
                # built one tensor at a time while written: a whole zero state would be as
                # large as the model, which must not need to fit in memory
                metas = self.slot_metas()
                self.store = DiskStore.create(directory, lock, manifest, initial, metas)
            except BaseException:
                self.runner.close()  # the store released the lock
                raise
            return
        try:
            self.store = DiskStore.open(directory, lock=lock, read_only=read_only)
        except BaseException:
            self.runner.close()
            raise
        try:
            self.strategy = self._resume(strategy, hparams, linear)
        except BaseException:
            self.store.close()  # release the directory's lock at once, not at collection
            self.runner.close()
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
        if manifest.count != 0 or manifest.generation != 0:
            return
        wanted = parse_strategy(strategy, **hparams).spec()
        if wanted == manifest.strategy and linear == manifest.linear_pattern:
            return
        # the manifest goes first: its generation-0 file is then a leftover the creation clears
        with writing(directory / MANIFEST):
            os.unlink(directory / MANIFEST)
            fsync_dir(directory)
        warnings.warn(
            f"{directory}: the state had folded nothing yet ({manifest.strategy}); "
            f"starting it anew with {wanted}",
            Notice,
            stacklevel=3,
        )

    def _new_strategy(self, strategy: str | Strategy | None, hparams: dict[str, Any]) -> Strategy:
        if strategy is None:
            raise StateError("a strategy is needed to start a new merge state")
        return parse_strategy(strategy, **hparams)

    def _new_manifest(self, linear: str | None) -> Manifest:
        base = BaseRecord(
            source=self._base_source or self.base.source,
            fingerprint=self.base_tensors.fingerprint(self.infos),
            tensors=len(self.infos),
            linear_weights=sum(i.is_linear for i in self.infos.values()),
            record=self._base_record(),
        )
        return Manifest(
            strategy=self.strategy.spec(),
            base=base,
            globals={**self.strategy.init_globals(), "count": 0},
            arrivals=(),
            generation=0,
            linear_pattern=linear,
            created=now(),
        )

    def _resume(
        self, strategy: str | Strategy | None, hparams: dict[str, Any], linear: str | None
    ) -> Strategy:
        manifest = self.store.manifest
        saved = parse_strategy(manifest.strategy)
        if strategy is not None:
            wanted = parse_strategy(strategy, **hparams)
            if wanted.spec() != saved.spec():
                raise StateError(
                    f"{self.store.path}: state was made with {saved.spec()}, not {wanted.spec()}"
                )
        pattern = manifest.linear_pattern
        recorded = manifest.base
        record = None if self.verify_base else self._recorded_base(recorded)
        if record is not None:  # the very base the state last read, unchanged
            self.infos = tensor_infos(self.base, pattern, list(record.linear))
            self.base_tensors.sum_sq = dict(record.sum_sq)
        else:
            self.infos = tensor_infos(self.base, pattern)
            fingerprint = self.base_tensors.fingerprint(self.infos)
            if fingerprint != recorded.fingerprint:
                raise StateError(
                    f"{self.store.path}: base {self.base.source} is not the base this state was "
                    f"started from ({recorded.source}): its fingerprint is {fingerprint[:16]}…, "
                    f"the state's {recorded.fingerprint[:16]}… (give --base the base it was "
                    "started from)"
                )
            known = self._base_record()
            if not self.read_only and known is not None:  # recorded by the next commit
                self.store.manifest = replace(manifest, base=replace(recorded, record=known))
        assert isinstance(self.store, DiskStore)
        if self.store.slot_metas != self.slot_metas(saved):
            raise StateError(
                f"{self.store.path}/{manifest.state_file}: its state tensors are not those "
                f"{saved.spec()} keeps for this base; nothing was changed"
            )
        return saved

    def _base_record(self) -> KnownBase | None:
        """What a later open of this unchanged base takes instead of reading it (``record``);
        None for a base that is not files, or whose norms JSON cannot hold."""
        if self._base_identity is None or not all(map(math.isfinite, self.base_sq.values())):
            return None
        linear = tuple(sorted(n for n, i in self.infos.items() if i.is_linear))
        return KnownBase(self._base_identity, linear, dict(self.base_sq))

    def _recorded_base(self, base: BaseRecord) -> KnownBase | None:
        """The state's record of its base if it is of this base's files as they are now (a
        hand-edited, malformed or older manifest has none: the base is read)."""
        record = base.record
        if (
            self._base_identity is None
            or record is None
            or record.identity != self._base_identity
            or record.sum_sq.keys() != set(self._float_names)
        ):
            return None
        return record

    def slot_metas(self, strategy: Strategy | None = None) -> dict[str, TensorMeta]:
        strategy = strategy or self.strategy
        return {
            slot_key(name, slot): meta
            for name in self._float_names
            for slot, meta in strategy.slots(self.infos[name]).items()
        }

    # --- inspection -----------------------------------------------------------------------
    @property
    def manifest(self) -> Manifest:
        return self.store.manifest

    @property
    def count(self) -> int:
        return self.manifest.count

    @property
    def arrivals(self) -> list[ArrivalRecord]:
        return list(self.manifest.arrivals)

    @property
    def base_sq(self) -> dict[str, float]:
        """‖θ0‖² per float tensor of the base (the another-base check's denominators)."""
        return self.base_tensors.sum_sq

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
        recorded = name or _recorded_source(source, arrival)
        run = FoldRun(self, arrival, opened_extras, (label, recorded), identity, weight, started)
        with run:
            return run.run()

    def _known_file(self, identity: str | None, label: str, started: float) -> FoldResult | None:
        """The very same file, unchanged, was folded before: its result, with no reading."""
        for record in self.manifest.arrivals if identity is not None else ():
            if record.file == identity:
                seconds = time.perf_counter() - started
                return FoldResult("duplicate", record.index, record.hash, label, seconds)
        return None

    def context(
        self,
        index: int,
        extras: dict[str, Checkpoint] | None = None,
        weight: float | None = None,
    ) -> FoldContext:
        """The ``FoldContext`` of the arrival folded ``index``-th."""
        return FoldContext(
            index=index,
            globals=dict(self.manifest.globals),
            extras=extras or {},
            numel=sum(self.infos[n].meta.numel for n in self._float_names),
            float64=any(self.infos[n].compute_dtype == torch.float64 for n in self._float_names),
            weight=1.0 if weight is None else float(weight),
            device=self.device,
        )

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
        if len(todo) < 2 or not groupable(self, len(todo)):
            return None
        arrivals: list[Checkpoint] = []
        try:
            for position, _ in todo:
                arrivals.append(open_checkpoint(sources[position], self.base.meta))
                check_layout(arrivals[-1], self.infos, self._float_names)
            if not all(a.carries_full_weights for a in arrivals):
                return None
            with torch_threads(self.threads):
                identities = [identity for _, identity in todo]
                recorded = [_recorded_source(sources[p], a) for (p, _), a in zip(todo, arrivals)]
                folded = GroupRun(self, arrivals, identities, recorded).run()
        except ContmergeError:  # one by one, the same arrival is refused and says why
            return None
        finally:
            for arrival in arrivals:
                arrival.close()
        if folded is None:
            return None
        for (position, _), (index, accepted, ignored) in zip(todo, folded):
            results[position] = folded_result(index, accepted, ignored, started)
        return [results[p] for p in range(len(sources))]

    def _open_extras(
        self, source: Source, extras: Mapping[str, Source] | None, label: str
    ) -> dict[str, Checkpoint]:
        """The arrival's statistics by kind: given, or its sidecar file. Missing ones are
        refused here, before anything is read or the state touched."""
        opened: dict[str, Checkpoint] = {}
        try:
            for kind in self.strategy.needs_extras:
                given = (extras or {}).get(kind)
                sidecar = _sidecar(source, kind)
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
        globals_ = self.manifest.globals
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
            if not state_finite({"merged": merged}):
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
        self.store.close()
        self.base_tensors.close()
        self.runner.close()

    def __enter__(self) -> Merger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _recorded_source(source: Source, arrival: Checkpoint) -> str:
    """An arrival's file as the manifest records it: absolute, so that the record still names
    it from another directory (as the base's path is); an in-memory one by its label."""
    return os.path.abspath(arrival.source) if isinstance(source, (str, Path)) else arrival.source


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


def _sidecar(source: Source, kind: str) -> Path | None:
    if not isinstance(source, (str, Path)):
        return None
    path = Path(source)
    return path.with_name(sidecar_name(path.name, kind))


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
