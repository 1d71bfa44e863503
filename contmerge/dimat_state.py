"""DIMAT as a durable per-agent merge step: neighbours fold into an anchor one at a time.

:class:`DimatState` keeps, in a :class:`~contmerge.datastate.DataState` directory, the anchor
and every folded neighbour (path, content hash, file identity, mixing weight, how far its
assignment was from the identity) and the accumulator ``π_ii·θ_i + Σ_j π_ij·P_j(θ_j)`` of
:class:`~contmerge.strategies.dimat.DimatFold` — the same fold the decentralized simulations
(in process and through Flower) run. Each neighbour is one commit; a neighbour met again (same
content hash) is skipped. Weights are kept unnormalised (default 1 each: the uniform average
over the anchor and its neighbours) and divided by their sum when the model is emitted, after
which the BatchNorm statistics are recomputed on the calibration data. Memory: the anchor, the
accumulator and one neighbour, whatever the number of neighbours.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .datastate import ArrivalResult, DataState, arrival_record, check_unchanged
from .errors import SettingError, StateError
from .objectives import load_calibration, spec_identity
from .tensorfile import write_safetensors

KIND = "dimat"
SETTINGS = ("self_weight",)


class DimatState:
    """A DIMAT state directory, open for folding (or ``read_only``)."""

    def __init__(
        self,
        directory: str | Path,
        calibration: str | None = None,
        settings: Mapping[str, Any] | None = None,
        *,
        model: str | None = None,
        read_only: bool = False,
    ) -> None:
        self.store = DataState(directory, read_only=read_only)
        try:
            manifest = self.store.existing(KIND)
            if manifest is None:
                if not calibration:
                    raise SettingError(
                        "a new DIMAT state needs --calibration (a dataset file or module:fn)"
                    )
                unknown = sorted(set(settings or {}) - set(SETTINGS))
                if unknown:
                    raise SettingError(
                        f"unknown DIMAT setting(s) {', '.join(unknown)}; known: "
                        + ", ".join(SETTINGS)
                    )
                manifest = {
                    "kind": KIND,
                    "calibration": calibration,
                    "calibration_hash": spec_identity(calibration),
                    "model": model,
                    "settings": dict(settings or {}),
                    "anchor": None,
                    "neighbours": [],
                    "total_weight": 0.0,
                    "tensors": None,
                }
            else:
                _check_same(manifest, calibration, model)
            self.manifest = manifest
            self._fold: Any = None
        except BaseException:
            self.store.close()
            raise

    @property
    def count(self) -> int:
        return len(self.manifest["neighbours"])

    def _open_fold(self, anchor: str) -> Any:
        """The DimatFold for this anchor, with the accumulator committed so far."""
        from contmerge.strategies.dimat import DimatFold

        if self._fold is None:
            data = load_calibration(self.manifest["calibration"], model=self.manifest["model"])
            self._fold = DimatFold(
                anchor,
                float(self.manifest["settings"].get("self_weight", 1.0)),
                model_factory=data.model_factory,
                spec=data.permutation_spec(),
                calibration=data.batches,
            )
            acc = self.store.tensors()
            if acc is not None:
                self._fold.restore(acc, self.manifest["total_weight"], self.count)
        return self._fold

    def fold(
        self, paths: Sequence[str | Path], weights: Sequence[float | None] = ()
    ) -> list[ArrivalResult]:
        """Fold ``paths`` in order; the first is the anchor when the state is new. ``weights``:
        one mixing weight per path (None or missing: 1; the anchor's is ``self_weight``)."""
        results: list[ArrivalResult] = []
        weights = list(weights) + [None] * (len(paths) - len(weights))
        for path, weight in zip(paths, weights):
            record = arrival_record(path)
            anchor = self.manifest["anchor"]
            if anchor is None:
                if weight is not None:
                    self.manifest["settings"]["self_weight"] = float(weight)
                self.manifest["anchor"] = record
                self.manifest["total_weight"] = float(
                    self.manifest["settings"].get("self_weight", 1.0)
                )
                fold = self._open_fold(record["path"])
                self.manifest = self.store.commit(self.manifest, fold.acc)
                results.append(ArrivalResult("anchor", str(path), record["hash"], 0))
                continue
            seen = [anchor, *self.manifest["neighbours"]]
            index = next((i for i, r in enumerate(seen) if r["hash"] == record["hash"]), None)
            if index is not None:
                results.append(ArrivalResult("duplicate", str(path), record["hash"], index))
                continue
            check_unchanged(anchor)
            fold = self._open_fold(anchor["path"])
            w = 1.0 if weight is None else float(weight)
            fold.add(record["path"], w)
            diagnostics = fold.diagnostics[-1]
            record.update(
                weight=w,
                identity_fraction={k: round(d.identity, 4) for k, d in diagnostics.items()},
            )
            neighbours = [*self.manifest["neighbours"], record]
            manifest = {
                **self.manifest,
                "neighbours": neighbours,
                "total_weight": fold.total_weight,
            }
            self.manifest = self.store.commit(manifest, fold.acc)
            results.append(ArrivalResult("folded", str(path), record["hash"], len(neighbours)))
        return results

    def merged(self) -> dict[str, Any]:
        """The merge so far: weights normalised, BatchNorm statistics recomputed."""
        anchor = self.manifest["anchor"]
        if anchor is None:
            raise StateError(f"{self.store.directory}: nothing merged yet (no anchor)")
        check_unchanged(anchor)
        fold = self._open_fold(anchor["path"])
        self._fold = None  # finish consumes it
        return fold.finish(normalise=True)

    def emit(self, out: str | Path) -> Path:
        from .atomic import atomic_open

        merged = self.merged()
        with atomic_open(out) as handle:
            write_safetensors(handle, merged, {"format": "pt", "contmerge": "dimat"})
        return Path(out)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> DimatState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_same(manifest: Mapping[str, Any], calibration: str | None, model: str | None) -> None:
    if calibration is not None and calibration != manifest["calibration"]:
        raise StateError(
            f"--calibration {calibration}: this DIMAT state's is {manifest['calibration']}"
        )
    recorded = manifest.get("calibration_hash")
    if recorded and spec_identity(manifest["calibration"]) != recorded:
        raise StateError(f"{manifest['calibration']}: changed since this DIMAT state was started")
    if model is not None and model != manifest.get("model"):
        raise StateError(f"--model {model}: this DIMAT state's model is {manifest.get('model')}")
