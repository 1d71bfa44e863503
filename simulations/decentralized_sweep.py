"""DIMAT vs WA over topologies × partitions × seeds, with mean ± std per round.

For each (partition, seed) the agents are pretrained once (``prepare_agents``, with its
alignability check) and reused for every topology; each (partition, topology, seed) run is saved
as it finishes (``runs/<partition>-<topology>-seed<k>.json``), so a killed sweep keeps what it
finished and a rerun skips it. ``summary.md`` holds, per (partition, topology), the per-round
mean ± std over seeds of both methods (right after the merge and after local training), the
bytes sent per round, the alignability checks, and the verdict inputs: initial gain, rounds in
which DIMAT leads, and the bytes each method needs to reach a target accuracy.

``python -m contmerge.simulations.decentralized_sweep --rounds 30 --seeds 0,1,2`` (every option
of ``contmerge simulate decentralized`` is accepted; ``--topology/--partition/--seed`` are
replaced by the lists below).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from contmerge.strategies.dimat import TOPOLOGIES, make_topology

from . import decentralized as dz
from .options import names_list

#: fraction of the better method's final accuracy that "reaching the target" means
TARGET_FRACTION = 0.95


def run_name(partition: str, topology: str, seed: int) -> str:
    return f"{partition}-{topology}-seed{seed}"


def run_sweep(
    base: dz.DecentralizedConfig,
    topologies: Sequence[str],
    partitions: Sequence[str],
    seeds: Sequence[int],
    output_dir: Path,
) -> dict[str, Any]:
    """Run (or load, when already saved) every combination; write and return the summary."""
    started = time.perf_counter()
    runs_dir = output_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    with dz.torch_threads(base.threads):
        results = _run_all(base, topologies, partitions, seeds, runs_dir)
    summary = summarise(results, topologies, partitions, seeds)
    summary["seconds"] = time.perf_counter() - started
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (output_dir / "summary.md").write_text(summary_markdown(summary))
    return summary


def _run_all(
    base: dz.DecentralizedConfig,
    topologies: Sequence[str],
    partitions: Sequence[str],
    seeds: Sequence[int],
    runs_dir: Path,
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for partition in partitions:
        for seed in seeds:
            cfg = replace(base, partition=partition, seed=seed, output_dir=None)
            saved = [
                (runs_dir / f"{run_name(partition, t, seed)}.json").exists() for t in topologies
            ]
            agents = None
            if not all(saved):
                dz.check_config(cfg)
                agents = dz.prepare_agents(cfg, cfg.agents)
            for topology in topologies:
                name = run_name(partition, topology, seed)
                path = runs_dir / f"{name}.json"
                if path.exists():
                    results[name] = json.loads(path.read_text())
                    continue
                tcfg = replace(cfg, topology=topology)
                assert agents is not None
                result = dz.run_methods(tcfg, make_topology(topology, cfg.agents), agents)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(result))
                tmp.replace(path)
                results[name] = result
    return results


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _curves(runs: Sequence[Mapping[str, Any]], method: str, key: str) -> np.ndarray:
    return np.array([r["runs"][method][key] for r in runs], dtype=float)  # seeds × rounds


def bytes_to_reach(curve: Sequence[float], target: float, per_round: int) -> int | None:
    """Bytes sent until the first round whose accuracy reaches ``target`` (None: never)."""
    for r, acc in enumerate(curve, start=1):
        if acc >= target:
            return r * per_round
    return None


def summarise(
    results: Mapping[str, Mapping[str, Any]],
    topologies: Sequence[str],
    partitions: Sequence[str],
    seeds: Sequence[int],
) -> dict[str, Any]:
    groups: dict[str, Any] = {}
    for partition in partitions:
        for topology in topologies:
            runs = [results[run_name(partition, topology, s)] for s in seeds]
            methods = list(runs[0]["runs"])
            per_round = runs[0]["bytes_per_round"]
            group: dict[str, Any] = {
                "partition": partition,
                "topology": topology,
                "seeds": list(seeds),
                "bytes_per_round": per_round,
                "shortcut": runs[0]["shortcut"],
                "pretrained": _mean_std([r["initial_accuracy"] for r in runs]),
                "methods": {},
            }
            for method in methods:
                entry: dict[str, Any] = {}
                for key in ("merged", "trained"):
                    curves = _curves(runs, method, key)
                    std = curves.std(axis=0, ddof=1) if len(runs) > 1 else 0 * curves[0]
                    entry[key] = {"mean": curves.mean(axis=0).tolist(), "std": std.tolist()}
                identity = [
                    [m.get("identity") for m in r["runs"][method]["matching"]] for r in runs
                ]
                if all(v is not None for row in identity for v in row):
                    entry["identity"] = np.mean(identity, axis=0).tolist()
                entry["seconds"] = _mean_std(
                    [sum(r["runs"][method]["merge_seconds"]) for r in runs]
                )
                group["methods"][method] = entry
            if {"dimat", "wa"} <= set(methods):
                group["verdict"] = verdict(runs, per_round)
            groups[f"{partition}/{topology}"] = group
    alignability = {}
    for partition in partitions:
        checks = [results[run_name(partition, topologies[0], s)]["alignability"] for s in seeds]
        if all(checks):
            alignability[partition] = {
                which: {
                    k: _mean_std([c[which][k] for c in checks])
                    for k in ("endpoints", "dimat", "wa", "identity", "matched_corr")
                }
                for which in ("pair", "all")
            }
    cfg = next(iter(results.values()))["config"]
    return {
        "config": cfg,
        "model_parameters": next(iter(results.values()))["model_parameters"],
        "model_bytes": next(iter(results.values()))["model_bytes"],
        "groups": groups,
        "alignability": alignability,
    }


def verdict(runs: Sequence[Mapping[str, Any]], per_round: int) -> dict[str, Any]:
    """The inputs of "faster and higher initial gain, lower communication", per seed then
    averaged: gain of round 1 over the pretrained agents, rounds in which DIMAT's mean leads,
    and bytes to reach TARGET_FRACTION of the better method's final accuracy (after training)."""
    out: dict[str, Any] = {}
    for key in ("merged", "trained"):
        d, w = _curves(runs, "dimat", key), _curves(runs, "wa", key)
        initial = np.array([r["initial_accuracy"] for r in runs])
        out[key] = {
            "gain_round1": {
                "dimat": _mean_std(d[:, 0] - initial),
                "wa": _mean_std(w[:, 0] - initial),
            },
            "dimat_leads_rounds": [
                int(r + 1) for r in np.flatnonzero(d.mean(axis=0) > w.mean(axis=0))
            ],
            "final": {"dimat": _mean_std(d[:, -1]), "wa": _mean_std(w[:, -1])},
        }
        reach: dict[str, list[int | None]] = {"dimat": [], "wa": []}
        for s in range(len(runs)):
            target = TARGET_FRACTION * max(d[s, -1], w[s, -1])
            reach["dimat"].append(bytes_to_reach(d[s], target, per_round))
            reach["wa"].append(bytes_to_reach(w[s], target, per_round))
        out[key]["bytes_to_target"] = reach
    return out


# ------------------------------------------------------------------------------------------
# Report


def _pm(mean_std: Sequence[float], digits: int = 3) -> str:
    mean, std = mean_std
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _bytes(values: Sequence[int | None]) -> str:
    done = [v for v in values if v is not None]
    if not done:
        return "never"
    text = f"{np.mean(done) / 1e6:.2f} MB"
    return text if len(done) == len(values) else f"{text} ({len(done)}/{len(values)} seeds)"


def group_table(group: Mapping[str, Any], rounds: Sequence[int] | None = None) -> str:
    methods = group["methods"]
    n = len(next(iter(methods.values()))["merged"]["mean"])
    rows = rounds or range(1, n + 1)
    labels = [dz.METHOD_LABELS[m] for m in methods]
    head = " | ".join(f"{lab} merged | {lab} trained" for lab in labels)
    lines = [
        f"| round | {head} | bytes sent |",
        "|---|" + "---|" * (2 * len(methods) + 1),
        f"| 0 (pretrained) | {_pm(group['pretrained'])} |"
        + " – |" * (2 * len(methods) - 1)
        + " 0 |",
    ]
    for r in rows:
        if r > n:
            continue
        cells = []
        for entry in methods.values():
            for key in ("merged", "trained"):
                cells.append(_pm((entry[key]["mean"][r - 1], entry[key]["std"][r - 1])))
        lines.append(f"| {r} | " + " | ".join(cells) + f" | {group['bytes_per_round'] * r:,} |")
    return "\n".join(lines)


def summary_markdown(summary: Mapping[str, Any], rounds: Sequence[int] | None = None) -> str:
    cfg = summary["config"]
    lines = [
        "# DIMAT vs WA: mean ± std over seeds",
        "",
        f"Model {cfg['model']} width {cfg['width']} ({summary['model_parameters']:,} parameters, "
        f"{summary['model_bytes']:,} bytes), {cfg['agents']} agents, {cfg['n_train']} training "
        f"images, pretraining {cfg['pretrain_epochs']} epochs, {cfg['rounds']} rounds × "
        f"{cfg['local_epochs']} local epochs, calibration {cfg['calibration']}, BatchNorm "
        f"momentum after reset: {cfg['bn_momentum']}, FC shortcut: {cfg['fc_shortcut']}. "
        "'bytes sent' is cumulative.",
        "",
        "## Alignability check (one-shot merge of the pretrained agents)",
        "",
        "| partition | merge | endpoints | DIMAT | WA | identity | matched corr |",
        "|---|---|---|---|---|---|---|",
    ]
    for partition, check in summary["alignability"].items():
        for which in ("pair", "all"):
            c = check[which]
            lines.append(
                f"| {partition} | {which} | {_pm(c['endpoints'])} | {_pm(c['dimat'])} | "
                f"{_pm(c['wa'])} | {_pm(c['identity'], 2)} | {_pm(c['matched_corr'], 2)} |"
            )
    lines += [
        "",
        "## Verdict inputs (after merge / after local training)",
        "",
        "| partition/topology | bytes/round | gain round 1 DIMAT | gain round 1 WA | DIMAT leads "
        "in rounds | final DIMAT | final WA | bytes to 95 % DIMAT | bytes to 95 % WA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, group in summary["groups"].items():
        v = group.get("verdict")
        if not v:
            continue
        for key in ("merged", "trained"):
            k = v[key]
            leads = k["dimat_leads_rounds"]
            lines.append(
                f"| {name} ({key}) | {group['bytes_per_round']:,} | "
                f"{_pm(k['gain_round1']['dimat'])} | {_pm(k['gain_round1']['wa'])} | "
                f"{_ranges(leads)} | {_pm(k['final']['dimat'])} | {_pm(k['final']['wa'])} | "
                f"{_bytes(k['bytes_to_target']['dimat'])} | {_bytes(k['bytes_to_target']['wa'])} |"
            )
    for name, group in summary["groups"].items():
        lines += ["", f"## {name}", "", group_table(group, rounds)]
        if "identity" in group["methods"].get("dimat", {}):
            ident = group["methods"]["dimat"]["identity"]
            lines += [
                "",
                "DIMAT identity assignments (fraction, mean over seeds), rounds 1, 2, 5, last: "
                + ", ".join(f"{ident[r - 1]:.2f}" for r in _marks(len(ident))),
            ]
    return "\n".join(lines) + "\n"


def _marks(n: int) -> list[int]:
    return sorted({r for r in (1, 2, 5, n) if r <= n})


def _ranges(rounds: Sequence[int]) -> str:
    """[1, 2, 3, 7] -> '1–3, 7'."""
    if not rounds:
        return "none"
    parts, start, prev = [], rounds[0], rounds[0]
    for r in [*rounds[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(f"{start}" if start == prev else f"{start}–{prev}")
        if r is not None:
            start = prev = r
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = dz.add_decentralized_arguments(
        argparse.ArgumentParser(description=__doc__.splitlines()[0])
    )
    parser.add_argument("--topologies", type=names_list, default=("fc", "ring", "bipartite"))
    parser.add_argument("--partitions", type=names_list, default=("iid", "non-iid"))
    parser.add_argument(
        "--seeds", type=lambda t: tuple(int(x) for x in names_list(t)), default=(0, 1, 2)
    )
    parser.set_defaults(output_dir="contmerge-runs/decentralized-sweep")
    args = parser.parse_args(argv)
    unknown = [t for t in args.topologies if t not in TOPOLOGIES]
    if unknown:
        parser.error(f"unknown topologies {unknown}; known: {', '.join(TOPOLOGIES)}")
    base = dz.config_from_args(args)
    summary = run_sweep(base, args.topologies, args.partitions, args.seeds, Path(args.output_dir))
    print(summary_markdown(summary), end="")
    print(f"{summary['seconds']:.0f} s; reports: {args.output_dir}/summary.{{md,json}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
