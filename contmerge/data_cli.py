"""``contmerge merge/emit/inspect`` for the data-informed merges (FW-Merging, DIMAT).

``contmerge.cli`` hands a command here when ``--strategy`` names fw or dimat, or when the state
directory is one of theirs (:func:`contmerge.datastate.is_data_state`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from .datastate import MANIFEST, ArrivalResult, is_data_state, read_data_manifest
from .errors import SettingError, StateError

KIND_OF_STRATEGY = {"fw": "fw", "dimat": "dimat"}


def add_merge_options(parser: argparse.ArgumentParser, calibration: bool = True) -> None:
    """The options only the data-informed strategies read (``merge``: fw and dimat; ``serve``,
    ``calibration=False``: fw)."""
    parser.add_argument(
        "--objective",
        metavar="DATA",
        help="fw: the objective, a labelled .safetensors dataset (x.TASK, y.TASK; metadata "
        "'model') or module:function returning an Objective (docs/frank_wolfe.md); each "
        "arrival joins the pool and FW iterations run",
    )
    if calibration:
        parser.add_argument(
            "--calibration",
            metavar="DATA",
            help="dimat: calibration inputs, a .safetensors file (x; metadata 'model') or "
            "module:function returning contmerge.objectives.Calibration (docs/dimat.md)",
        )
    parser.add_argument(
        "--model",
        metavar="MODULE:FUNCTION",
        help="fw (and dimat, under merge): the model the checkpoints hold, overriding the "
        "dataset's 'model'",
    )


def kind_of(args: argparse.Namespace) -> str | None:
    """fw or dimat when this command is theirs, else None (a Merger state). A ``--strategy``
    that does not match the kind of the state directory is refused."""
    state, strategy = getattr(args, "state", None), getattr(args, "strategy", None)
    named = _strategy_kind(strategy)
    if state and is_data_state(state):
        manifest = read_data_manifest(Path(state))
        assert manifest is not None
        kind = str(manifest["kind"])
        if strategy and named != kind:
            raise StateError(f"{state}: a {kind} state, not one of {strategy}")
        return kind
    if named and state and (Path(state) / "manifest.json").exists():
        raise StateError(f"{state}: a state of a fold rule, not of {named}")
    return named


def _strategy_kind(strategy: str | None) -> str | None:
    if not strategy:
        return None
    name = strategy.strip()
    if not name.lower().startswith(("fw", "frank", "dimat")):
        return None  # the registry imports torch: a no-op merge answers without it
    from .registry import elsewhere

    found = elsewhere(name)
    return KIND_OF_STRATEGY.get(found[0]) if found else None


def _settings(args: argparse.Namespace) -> dict[str, object]:
    from .merger_options import parse_settings

    return parse_settings(args.set)


def _print_results(results: Sequence[ArrivalResult]) -> None:
    for r in results:
        what = {
            "joined": f"joined the pool as #{r.index}",
            "anchor": "is the anchor",
            "folded": f"folded as neighbour #{r.index}",
            "duplicate": f"already in the state as #{r.index} (skipped)",
        }[r.status]
        print(f"{r.source}: {what}")


def cmd_merge(args: argparse.Namespace, kind: str) -> int:
    settings = _settings(args)
    if kind == "fw":
        from .fw_state import FwState

        if args.calibration:
            raise SettingError("--calibration is DIMAT's; FW-Merging takes --objective")
        with FwState(
            args.state, args.base, args.objective, settings, model=args.model,
            progress=not args.quiet,
        ) as state:  # fmt: skip
            before = state.merger.iteration
            print(f"state {args.state}: fw, {len(state.manifest['pool'])} in the pool, "
                  f"iteration {before}")  # fmt: skip
            results = state.fold(args.checkpoints)
            _print_results(results)
            for record in state.merger.history[before:]:
                chosen = record.selected(next(iter(record.choices)))
                print(f"iteration {record.iteration}: loss {record.loss:.6g}, "
                      f"chose {', '.join(chosen)}")  # fmt: skip
            if args.out:
                print(f"merged model written to {state.emit(args.out)}")
        return 0
    from .dimat_state import DimatState

    if args.objective:
        raise SettingError("--objective is FW-Merging's; DIMAT takes --calibration")
    if args.weight and len(args.weight) != len(args.checkpoints):
        raise SettingError("--weight: give one per CKPT, in the same order")
    with DimatState(args.state, args.calibration, settings, model=args.model) as state:
        print(f"state {args.state}: dimat, {state.count} neighbour(s) folded so far")
        _print_results(state.fold(args.checkpoints, args.weight))
        if args.out:
            print(f"merged model written to {state.emit(args.out)}")
    return 0


def cmd_emit(args: argparse.Namespace, kind: str) -> int:
    if not str(args.out).endswith(".safetensors"):
        raise SettingError(f"--out {args.out}: a {kind} state emits one .safetensors file")
    if kind == "fw":
        from .fw_state import FwState

        with FwState(args.state, read_only=True) as state:
            path = state.emit(args.out)
            print(f"merged model (fw, pool of {len(state.manifest['pool'])}, iteration "
                  f"{state.merger.iteration}) written to {path}")  # fmt: skip
        return 0
    from .dimat_state import DimatState

    # emitting recomputes BatchNorm statistics: it reads the calibration data, writes no state
    with DimatState(args.state, read_only=True) as state:
        path = state.emit(args.out)
        print(f"merged model (dimat, anchor and {state.count} neighbour(s)) written to {path}")
    return 0


def cmd_inspect(args: argparse.Namespace, kind: str) -> int:
    manifest = read_data_manifest(Path(args.state))
    if manifest is None:
        raise StateError(f"{args.state}: no {MANIFEST}")
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    print(f"strategy:  {kind}  (settings {manifest['settings']})")
    print(f"state:     generation {manifest['generation']}, tensors {manifest['tensors']}")
    if kind == "fw":
        print(f"base:      {manifest['base']['path']} ({manifest['base']['hash'][:12]})")
        print(f"objective: {manifest['objective']}")
        print(f"iteration: {manifest['iteration']} ({manifest['owed']} owed)")
        for i, r in enumerate(manifest["pool"]):
            print(f"  #{i:<4} {r['hash'][:12]}  {r['path']}")
        for r in manifest["log"]:
            chosen = sorted({c for per in r["choices"].values() for c in per.values() if c})
            print(f"  iteration {r['iteration']}: loss {r['loss']:.6g} step {r['step']} "
                  f"toward {', '.join(chosen)}")  # fmt: skip
        return 0
    print(f"calibration: {manifest['calibration']}")
    anchor = manifest["anchor"]
    print(f"anchor:    {anchor['path'] if anchor else '(none yet)'}  "
          f"weight {manifest['settings'].get('self_weight', 1.0)}")  # fmt: skip
    for i, r in enumerate(manifest["neighbours"], 1):
        print(f"  #{i:<4} {r['hash'][:12]}  weight {r['weight']}  identity "
              f"{r['identity_fraction']}  {r['path']}")  # fmt: skip
    return 0


def cmd_verify(args: argparse.Namespace, kind: str) -> int:
    """The committed tensors load, and every file the state reads is the one that joined."""
    from .datastate import DataState, check_unchanged

    with DataState(args.state, read_only=True) as store:
        manifest = store.check_kind(kind)
        tensors = store.tensors()
        records = (
            manifest["pool"] if kind == "fw" else [manifest["anchor"], *manifest["neighbours"]]
        )
        for record in records:
            if record is not None:
                check_unchanged(record)
    print(f"{args.state}: a {kind} state, generation {manifest['generation']}: "
          f"{len(tensors or {})} tensors read, {len([r for r in records if r])} checkpoint file(s) "
          "unchanged since they joined")  # fmt: skip
    return 0
