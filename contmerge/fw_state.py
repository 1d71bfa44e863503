"""FW-Merging with a durable, resumable state: arrivals join the pool, FW iterations run.

:class:`FwState` keeps, in a :class:`~contmerge.datastate.DataState` directory, the pool index
(each arrival's path, content hash and file identity; the files stay where they are and are
streamed every iteration, so memory does not grow with the pool), the current θ (in the
compute dtypes, so a resumed run continues bit for bit), the counters the step schedule and the
unlabelled loaders depend on, and the iteration log. Each iteration is a commit.

``fold(paths)``: the new arrivals (deduplicated by content hash) join the pool and
``iterations`` FW iterations are *owed* (recorded with the pool in one commit); then the owed
iterations run, each committed. A process killed at any point leaves the last commit; opening
the state again and folding anything (even nothing new) runs what is still owed, so the final
θ is the one an uninterrupted run gives.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .datastate import (
    ArrivalResult,
    DataState,
    arrival_record,
    check_unchanged,
    checkpoint_hash,
    keep_copy,
)
from .errors import SettingError, StateError
from .identity import file_identity
from .objectives import load_objective, spec_identity

KIND = "fw"
INITIAL = "initial.safetensors"
#: settings of the state itself (the rest go to FrankWolfeMerger)
OWN_SETTINGS = {"preset": "hard", "iterations": None}


def merger_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The FrankWolfeMerger keyword arguments of ``settings`` (preset applied), checked."""
    from contmerge.strategies.frank_wolfe import PRESETS, FrankWolfeMerger

    preset = settings.get("preset", OWN_SETTINGS["preset"])
    if preset not in PRESETS:
        raise SettingError(f"preset {preset!r}: known presets are {', '.join(PRESETS)}")
    allowed = set(inspect.signature(FrankWolfeMerger).parameters) - {
        "base", "pool", "objective", "work_dir", "progress",
    }  # fmt: skip
    unknown = sorted(k for k in settings if k not in allowed and k not in OWN_SETTINGS)
    if unknown:
        raise SettingError(
            f"unknown FW setting(s) {', '.join(unknown)}; known: "
            + ", ".join(sorted(allowed | set(OWN_SETTINGS)))
        )
    own = {k: v for k, v in settings.items() if k not in OWN_SETTINGS}
    return {**PRESETS[preset], **own}


class FwState:
    """An FW-Merging state directory, open for folding (or ``read_only``)."""

    def __init__(
        self,
        directory: str | Path,
        base: str | Path | None = None,
        objective: str | None = None,
        settings: Mapping[str, Any] | None = None,
        *,
        model: str | None = None,
        progress: bool = False,
        read_only: bool = False,
    ) -> None:
        from contmerge.strategies.frank_wolfe import FrankWolfeMerger, IterationRecord

        self.store = DataState(directory, read_only=read_only)
        try:
            manifest = self.store.existing(KIND)
            if manifest is None:
                manifest = self._new_manifest(base, objective, settings or {}, model)
            else:
                _check_same(manifest, base, objective, settings, model)
            self.manifest = manifest
            if not read_only:
                for record in manifest["pool"]:
                    check_unchanged(record)
            # reading (emit, inspect) needs no objective: only iterations evaluate it
            objective_obj = (
                None
                if read_only
                else load_objective(manifest["objective"], model=manifest.get("model"))
            )
            self.merger = FrankWolfeMerger(
                manifest["base"]["path"],
                [],
                objective_obj,
                work_dir=self.store.directory,
                progress=progress,
                **merger_settings(manifest["settings"]),
            )
            for record in manifest["pool"] if not read_only else ():
                self.merger.add(record["path"], label=record["source"])
            theta = self.store.tensors()
            if theta is not None:
                self.merger.restore(
                    theta,
                    iteration=manifest["iteration"],
                    ada_step=manifest["ada_step"],
                    history=[IterationRecord(**r) for r in manifest["log"]],
                    initial=self.store.directory / INITIAL if manifest["initial"] else None,
                    start_record=manifest.get("start"),
                )
        except BaseException:
            self.store.close()
            raise

    # --- creation ---------------------------------------------------------------------------
    def _new_manifest(
        self, base: Any, objective: str | None, settings: Mapping[str, Any], model: str | None
    ) -> dict[str, Any]:
        if base is None:
            raise SettingError("a new FW state needs --base (the model the pool was tuned from)")
        if not objective:
            raise SettingError("a new FW state needs --objective (a dataset file or module:fn)")
        merger_settings(settings)  # refuse unknown settings before anything is written
        return {
            "kind": KIND,
            "base": {"path": str(Path(base).resolve()), "hash": checkpoint_hash(base)},
            "objective": objective,
            "objective_hash": spec_identity(objective),
            "model": model,
            "settings": dict(settings),
            "pool": [],
            "iteration": 0,
            "owed": 0,
            "ada_step": 0,
            "initial": False,
            "start": {},
            "log": [],
            "tensors": None,
        }

    # --- folding ----------------------------------------------------------------------------
    @property
    def iterations_per_fold(self) -> int:
        given = self.manifest["settings"].get("iterations")
        return int(given if given is not None else self.merger.max_iters)

    def fold(
        self, paths: Sequence[str | Path], labels: Sequence[str] = (), *, keep_copies: bool = False
    ) -> list[ArrivalResult]:
        """New arrivals join the pool (one commit), then the iterations owed run (a commit
        each). Checkpoints already in the pool are reported as duplicates. ``keep_copies``:
        the pool keeps a copy of each arrival in the state (the server's arrivals are removed
        once folded); else it reads them where they are."""
        results: list[ArrivalResult] = []
        pool = list(self.manifest["pool"])
        known = {r["hash"]: i for i, r in enumerate(pool)}
        labels = list(labels) + [None] * (len(paths) - len(labels))  # type: ignore[list-item]
        committed = len(self.merger.pool)
        try:
            self._join(paths, labels, pool, known, results, keep_copies)
            if len(pool) > len(self.manifest["pool"]):
                owed = self.manifest["owed"] + self.iterations_per_fold
                self._commit(pool=pool, owed=owed)
        except BaseException:
            del self.merger.pool[committed:]  # nothing of this call was committed
            raise
        self.run_owed()
        return results

    def _join(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[str | None],
        pool: list[dict[str, Any]],
        known: dict[str, int],
        results: list[ArrivalResult],
        keep_copies: bool,
    ) -> None:
        for path, label in zip(paths, labels):
            record = arrival_record(path, label)
            if keep_copies and record["hash"] not in known:
                copy = keep_copy(self.store.directory, path, record["hash"])
                record.update(path=str(copy), file=file_identity(copy))
            if record["hash"] in known:
                results.append(
                    ArrivalResult("duplicate", str(path), record["hash"], known[record["hash"]])
                )
                continue
            self.merger.add(record["path"], label=record["source"])  # checks it fits the base
            known[record["hash"]] = len(pool)
            pool.append(record)
            results.append(ArrivalResult("joined", record["source"], record["hash"], len(pool) - 1))

    def run_owed(self) -> None:
        """Start θ if needed, then run the iterations still owed, committing each."""
        if not self.manifest["pool"]:
            return
        if self.store.manifest.get("tensors") is None:
            self.merger.start()
            self._commit(theta=True)
        while self.manifest["owed"] > 0:
            self.merger.run(1)
            self._commit(theta=True, owed=self.manifest["owed"] - 1)

    def _commit(self, *, theta: bool = False, **changes: Any) -> None:
        manifest = {**self.manifest, **changes}
        if theta:
            manifest.update(
                iteration=self.merger.iteration,
                ada_step=self.merger.ada_step,
                initial=self.merger.initial_path is not None,
                start=self.merger.start_record,
                log=[asdict(r) for r in self.merger.history],
                updated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
        self.manifest = self.store.commit(manifest, self.merger.theta() if theta else None)

    # --- output -----------------------------------------------------------------------------
    def emit(self, out: str | Path) -> Path:
        if self.store.manifest.get("tensors") is None:
            raise StateError(f"{self.store.directory}: nothing merged yet (the pool is empty)")
        return self.merger.save(out)

    def close(self) -> None:
        try:
            self.merger.close()
        finally:
            self.store.close()

    def __enter__(self) -> FwState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_same(
    manifest: Mapping[str, Any],
    base: Any,
    objective: str | None,
    settings: Mapping[str, Any] | None,
    model: str | None,
) -> None:
    """Options given again when resuming must be the state's own."""
    where = manifest.get("base", {}).get("path")
    if base is not None and Path(base).resolve() != Path(where):
        if checkpoint_hash(base) != manifest["base"]["hash"]:
            raise StateError(f"{base}: not the base this FW state was started from ({where})")
    if objective is not None and objective != manifest["objective"]:
        raise StateError(
            f"--objective {objective}: this FW state's objective is {manifest['objective']}"
        )
    if (
        manifest.get("objective_hash")
        and spec_identity(manifest["objective"]) != manifest["objective_hash"]
    ):
        raise StateError(f"{manifest['objective']}: changed since this FW state was started")
    if settings and dict(settings) != manifest["settings"]:
        raise StateError(
            f"settings {dict(settings)} differ from this FW state's {manifest['settings']}"
        )
    if model is not None and model != manifest.get("model"):
        raise StateError(f"--model {model}: this FW state's model is {manifest.get('model')}")
