"""FW-Merging's two claims, checked: pools of 4 relevant models plus 0, 8, 16 irrelevant ones
(FW stays flat while task arithmetic collapses), or plus 0, 8, 16 more relevant ones (FW improves).

Target tasks: four tasks of the suite (by default its first four, fixed before any run). Relevant
models: each target's fine-tuned backbone. Irrelevant models: backbones fine-tuned on the *other*
tasks of the suite. The suite has 8 tasks, so only 4 other tasks exist; to reach 16 irrelevant
models each other task also gets extra fine-tunes with a different seed on a different random
75 % of its training set ("variants"). The extra relevant models are variants of the targets made
the same way (another seed, another 75 % split of the target's training data).

Heads (the papers' kind, the checkpoint cache's own): fixed unit rows at the pretrained model's
class-mean features of each task, cosine logits × 100 (:mod:`contmerge.simulations.heads`, CLIP's
zero-shot heads); every fine-tune is trained through its task's frozen head, and every backbone
is judged with the same heads. Variant 0 of a task is the cache's independent fine-tune.

Per pool and seed: task arithmetic (λ = 0.3), TIES (the authors' batch form), AdaMerging over the
pool (FW-hard-headline's start), and FW-Merging with the authors' YAML defaults (``fw_hard``,
``fw_soft``) and with their README's vision headline settings (``fw_hard_headline``: AdaMerging
start, 3 iterations, step 0.01, layer-wise; ``fw_soft_headline``: 5 iterations, ada_coeff 1e-2),
plus the paper's ablation "soft without coefficient learning" (headline settings, ada_iters 0).
Data: the FW gradient uses 100 labelled *training* samples per target; the entropy of the soft
variant and of AdaMerging uses the targets' *test* inputs, unlabelled, as the authors do
(test-time adaptation; ``--soft-unlabelled train`` uses training images outside the 100).

``run_fw_pool(config)`` is the entry point; ``add_fw_arguments`` / ``main_fw`` are the CLI halves.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .continual import ContinualConfig, default_cache_dir
from .data import FASHION_DIR, Task, load_suite
from .evaluate import Evaluator
from .models import Backbone, ModelConfig, StateDict, head_from_state
from .options import add_no_progress, add_output_dir, check_names, names_list
from .train import (
    CheckpointCache,
    finetune_backbone,
    load_safetensors,
    save_safetensors,
)

#: method -> FW preset and overrides (``None``: not an FW method)
FW_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "fw_hard": ("hard", {}),
    "fw_hard_layer": ("hard", {"granularity": "layer"}),
    "fw_hard_headline": ("hard-headline", {}),
    "fw_soft": ("soft", {}),
    "fw_soft_headline": ("soft-headline", {}),
    "fw_soft_fixed": ("soft-headline", {"ada_iters": 0}),
    "fw_hard_linear": ("hard", {"lmo": "inner_product"}),
    "fw_hard_linear_layer": ("hard", {"lmo": "inner_product", "granularity": "layer"}),
}
METHODS = (
    "task_arithmetic", "ties", "adamerging", "fw_hard", "fw_hard_headline", "fw_soft",
    "fw_soft_headline", "fw_soft_fixed",
)  # fmt: skip
#: run only when asked for with --methods
EXTRA_METHODS = ("c_ties", "fw_hard_layer", "fw_hard_linear", "fw_hard_linear_layer")
LABELS = {
    "task_arithmetic": "Task Arithmetic (λ 0.3)",
    "ties": "TIES (batch)",
    "c_ties": "C. TIES (engine)",
    "adamerging": "AdaMerging (layer-wise, = FW-hard headline start)",
    "fw_hard": "FW-hard, YAML defaults (TA start, 10 it, step 0.1, task)",
    "fw_hard_layer": "FW-hard, YAML defaults, layer-wise",
    "fw_hard_headline": "FW-hard, headline (AdaMerging start, 3 it, step 0.01, layer)",
    "fw_soft": "FW-soft, YAML defaults (10 it, ada_coeff 1e-8)",
    "fw_soft_headline": "FW-soft, headline (5 it, ada_coeff 1e-2)",
    "fw_soft_fixed": "FW-soft headline, no coefficient learning (paper's ablation)",
    "fw_hard_linear": "FW-hard (task), paper's LMO ⟨g, s⟩",
    "fw_hard_linear_layer": "FW-hard (layer), paper's LMO ⟨g, s⟩",
}
VARIANT_RECIPE = "fw-variant-v1: seed derived from (seed, task, k); random 75 % of the train split"
VARIANTS_DIR = "fw-variants"  # under the cache's root (its key covers the training code)


@dataclass
class FwPoolConfig:
    """One run. ``None`` means: the default of the mode (quick or full)."""

    output_dir: str = "contmerge-runs/fw"
    cache_dir: str | None = None
    targets: tuple[str, ...] | None = None  # None: the suite's first four tasks
    irrelevant: tuple[int, ...] | None = None  # (0, 8, 16); quick: (0, 4)
    relevant: tuple[int, ...] = ()  # extra relevant variants, e.g. (8, 16); off by default
    methods: tuple[str, ...] = METHODS
    n_labelled: int = 100  # per target task, the authors' dataset_size
    max_iters: int | None = None  # None: each preset's (quick: 2)
    ada_iters: int | None = None  # 500 (authors); quick: 20
    adamerging_iters: int | None = None  # AdaMerging start; 500 (quick: 20)
    soft_unlabelled: str = "test"  # the authors' test-time adaptation, or "train"
    seeds: tuple[int, ...] = (0,)
    quick: bool = False
    use_fashion: bool | None = None
    fashion_dir: str = str(FASHION_DIR)
    progress: bool = True

    def base_config(self, seed: int) -> ContinualConfig:
        # the continual scenario's data and training settings: its checkpoint cache is shared
        return ContinualConfig(
            quick=self.quick,
            seed=seed,
            use_fashion=self.use_fashion,
            fashion_dir=self.fashion_dir,
            cache_dir=self.cache_dir,
        )

    def counts(self) -> tuple[int, ...]:
        if self.irrelevant is not None:
            return tuple(self.irrelevant)
        return (0, 4) if self.quick else (0, 8, 16)

    def overrides(self) -> dict[str, int]:
        """Iteration counts that replace the presets' (quick mode: small ones)."""
        quick = {"max_iters": 2, "ada_iters": 20, "adamerging_iters": 20} if self.quick else {}
        full = {"ada_iters": 500, "adamerging_iters": 500}
        out = {**full, **quick}
        for key in ("max_iters", "ada_iters", "adamerging_iters"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


# --------------------------------------------------------------------------------------------
# Heads and the pool


def _seed(*parts: object) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def variant_subset(task: Task, k: int, seed: int) -> Task:
    """Variant k's training data: all of it for k = 0, else a seeded random 75 %."""
    if k == 0:
        return task
    gen = torch.Generator().manual_seed(_seed(seed, "fw-subset", task.name, k))
    keep = torch.randperm(len(task.x_train), generator=gen)[: int(0.75 * len(task.x_train))]
    return replace(task, x_train=task.x_train[keep], y_train=task.y_train[keep])


def variant_checkpoint(cache: CheckpointCache, task: Task, k: int, seed: int) -> Path:
    """Fine-tune number k of ``task``, through the task's fixed head: k = 0 is the cache's own
    independent checkpoint, k > 0 another seed on another 75 % of the training data."""
    if k == 0:
        return cache.independent(task.name)
    path = cache.root / VARIANTS_DIR / f"{task.name}-v{k}.safetensors"
    if path.exists():
        return path
    state = finetune_backbone(
        cache.base(),
        load_safetensors(cache.head(task.name)),
        variant_subset(task, k, seed),
        cache.model_cfg,
        cache.cfg,
        seed=_seed(seed, "fw-finetune", task.name, k),
    )
    save_safetensors(path, state, {"kind": "fw-variant", "task": task.name, "k": str(k)})
    return path


def interleaved(tasks: Sequence[Task], count: int, first: int) -> list[tuple[Task, int]]:
    """``count`` (task, variant) pairs cycling over tasks: variant ``first`` of each, then the
    next variant, so a pool of 8 holds 2 models of each of 4 tasks."""
    if count and not tasks:
        raise ValueError("no tasks to draw models from")
    return [(tasks[i % len(tasks)], first + i // len(tasks)) for i in range(count)]


# --------------------------------------------------------------------------------------------
# Baselines


def batch_ties(
    base: StateDict, paths: Sequence[Path], scaling: float = 0.3, threshold: float = 20.0
) -> StateDict:
    """The authors' ``ties_merge``: per model keep the top ``threshold`` % |τ| of the flattened
    model, elect signs by the sum (zeros take the majority), sum agreeing entries, θ0 + λ·τ."""
    names = list(base)
    flat_base = torch.cat([base[n].reshape(-1) for n in names])
    rows = torch.stack(
        [torch.cat([load_safetensors(p)[n].reshape(-1) for n in names]) - flat_base for p in paths]
    )
    d = rows.shape[1]
    k = d - int(d * threshold / 100)
    kth = rows.abs().kthvalue(k, dim=1, keepdim=True).values
    trimmed = rows * (rows.abs() >= kth)
    signs = torch.sign(trimmed.sum(dim=0))
    signs[signs == 0] = torch.sign(signs.sum())
    agree = torch.where(signs > 0, trimmed > 0, trimmed < 0)
    merged = flat_base + scaling * (trimmed * agree).sum(dim=0)
    out, offset = {}, 0
    for n in names:
        size = base[n].numel()
        out[n] = merged[offset : offset + size].reshape(base[n].shape).clone()
        offset += size
    return out


def engine_merge(base: StateDict, strategy: str, paths: Sequence[Path]) -> StateDict:
    from contmerge import Merger

    with Merger(base, strategy, state_dir=None) as merger:
        for path in paths:
            merger.fold(str(path))
        return merger.emit_state_dict()


# --------------------------------------------------------------------------------------------
# One seed


def make_objective(
    targets: Sequence[Task],
    heads: Mapping[str, nn.Module],
    model_cfg: ModelConfig,
    n_labelled: int,
    soft_unlabelled: str,
    seed: int,
):
    """100 labelled train samples per target; its test inputs (or the rest of its train
    split) as the unlabelled data of the soft variant and of AdaMerging."""
    from contmerge.strategies.frank_wolfe import ClassifierObjective

    labelled, unlabelled = {}, {}
    for task in targets:
        gen = torch.Generator().manual_seed(_seed(seed, "fw-labelled", task.name))
        perm = torch.randperm(len(task.x_train), generator=gen)
        pick, rest = perm[:n_labelled], perm[n_labelled:]
        labelled[task.name] = (task.x_train[pick], task.y_train[pick])
        unlabelled[task.name] = task.x_test if soft_unlabelled == "test" else task.x_train[rest]
    return ClassifierObjective(
        Backbone(model_cfg),
        {t.name: heads[t.name] for t in targets},
        labelled,
        unlabelled,
        seed=_seed(seed, "fw-ada"),
    )


def run_fw(
    method: str,
    base_path: Path,
    pool: Mapping[str, Path],
    objective: Any,
    overrides: Mapping[str, int],
) -> tuple[StateDict, list[dict[str, Any]], dict[str, Any], StateDict]:
    """One FW method on one pool: (merged, iteration trace, start record, start state)."""
    from contmerge.strategies.frank_wolfe import FrankWolfeMerger

    preset, extra = FW_METHODS[method]
    settings = {**extra, **overrides}
    if "ada_iters" in extra:  # the ablation's 0 wins over the run's ada_iters
        settings["ada_iters"] = extra["ada_iters"]
    with FrankWolfeMerger.from_preset(preset, base_path, dict(pool), objective, **settings) as fw:
        start = fw.merged()
        fw.run()
        trace = [
            {
                "iteration": r.iteration,
                "loss": r.loss,
                "selected": {key: r.selected(key) for key in r.choices},
                "coefficients": r.coefficients,
                "seconds": r.seconds,
            }
            for r in fw.history
        ]
        return fw.merged(), trace, dict(fw.start_record), start


def run_seed(config: FwPoolConfig, seed: int) -> dict[str, Any]:
    """Train (or load cached) one seed's pools, merge every pool with every method."""
    started = time.perf_counter()
    base_cfg = config.base_config(seed)
    data_cfg, train_cfg, model_cfg = base_cfg.data_config(), base_cfg.train_config(), ModelConfig()
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    suite = load_suite(replace(data_cfg, tasks=None))
    by_name = {t.name: t for t in suite.tasks}
    target_names = list(config.targets or suite.names[:4])
    check_names(target_names, suite.names, "--targets")
    targets = [by_name[n] for n in target_names]
    others = [t for t in suite.tasks if t.name not in target_names]
    cache = CheckpointCache(
        suite, data_cfg, model_cfg, train_cfg, cache_dir, progress=config.progress
    )
    base_path = cache.pretrained()
    base = load_safetensors(base_path)
    head_modules = {
        t.name: head_from_state(load_safetensors(cache.head(t.name)), model_cfg)
        for t in suite.tasks
    }

    relevant = [(t, 0) for t in targets]
    series = [("irrelevant", n, interleaved(others, n, 0)) for n in config.counts()]
    series += [("relevant", n, interleaved(targets, n, 1)) for n in config.relevant]
    needed = {(t.name, k): (t, k) for _, _, extra in series for t, k in relevant + extra}
    paths: dict[tuple[str, int], Path] = {}
    for key, (task, k) in tqdm(
        needed.items(), desc="pool checkpoints", disable=not config.progress
    ):
        paths[key] = variant_checkpoint(cache, task, k, seed)
    t_pool = time.perf_counter()

    evaluator = Evaluator(targets, head_modules, model_cfg)
    bounds = {
        "pretrained": evaluator.accuracy(base, target_names),
        "individual": {
            t.name: evaluator.accuracy(load_safetensors(paths[(t.name, 0)]), [t.name])[t.name]
            for t in targets
        },
    }
    objective = make_objective(
        targets, head_modules, model_cfg, config.n_labelled, config.soft_unlabelled, seed
    )
    # the headline FW-hard run computes its AdaMerging start: run it first and reuse the start
    order = sorted(config.methods, key=lambda m: m != "fw_hard_headline")
    runs = []
    jobs = [(s, m) for s in series for m in order]
    bar = tqdm(jobs, desc=f"merge + evaluate (seed {seed})", disable=not config.progress)
    starts: dict[tuple[str, int], tuple[StateDict, dict[str, Any]]] = {}
    for (kind, count, extra), method in bar:
        members = relevant + extra
        labels = [_label(t, k, t.name in target_names) for t, k in members]
        pool_paths = [paths[(t.name, k)] for t, k in members]
        bar.set_postfix_str(f"{kind}+{count} {method}")
        t0 = time.perf_counter()
        trace: list[dict[str, Any]] = []
        start_record: dict[str, Any] = {}
        if method == "task_arithmetic":
            merged = engine_merge(base, "task_arithmetic", pool_paths)
        elif method == "c_ties":
            merged = engine_merge(base, "ties", pool_paths)
        elif method == "ties":
            merged = batch_ties(base, pool_paths)
        elif method == "adamerging":
            if (kind, count) not in starts:
                _, _, record, start = run_fw(
                    "fw_hard_headline",
                    base_path,
                    dict(zip(labels, pool_paths)),
                    objective,
                    {**config.overrides(), "max_iters": 0},
                )
                starts[(kind, count)] = (start, record)
            merged, start_record = starts[(kind, count)]
        else:
            merged, trace, start_record, start = run_fw(
                method, base_path, dict(zip(labels, pool_paths)), objective, config.overrides()
            )
            if method == "fw_hard_headline":
                starts[(kind, count)] = (start, start_record)
        acc = evaluator.accuracy(merged, target_names)
        runs.append(
            {
                "series": kind,
                "added": count,
                "pool_size": len(members),
                "method": method,
                "accuracy": acc,
                "mean": float(np.mean(list(acc.values()))),
                "seconds": round(time.perf_counter() - t0, 2),
                "pool": labels,
                "fw_trace": trace,
                "start": start_record,
            }
        )
    return {
        "seed": seed,
        "data": asdict(data_cfg),
        "train": train_cfg.to_dict(),
        "sources": suite.sources,
        "notes": suite.notes,
        "targets": target_names,
        "other_tasks": [t.name for t in others],
        "cache_dir": str(cache.root),
        "bounds": bounds,
        "runs": runs,
        "timing_s": {
            "pool": round(t_pool - started, 1),
            "merge_and_eval": round(time.perf_counter() - t_pool, 1),
        },
    }


def run_fw_pool(config: FwPoolConfig) -> dict[str, Any]:
    """Every seed (``config.seeds``), then mean ± std over seeds; writes the reports."""
    started = time.perf_counter()
    unknown = [m for m in config.methods if m not in LABELS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(LABELS)}")
    if config.soft_unlabelled not in ("test", "train"):
        raise ValueError("soft_unlabelled must be 'test' or 'train'")
    if not config.seeds:
        raise ValueError("no seeds to run")
    threads = max(1, min(2, config.base_config(0).train_config().threads))
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        per_seed = [_seed_result(config, seed) for seed in config.seeds]
    finally:
        torch.set_num_threads(prev_threads)
    first = per_seed[0]
    results = {
        "scenario": "fw_pool",
        "config": asdict(config),
        "settings": config.overrides(),
        "sources": first["sources"],
        "notes": first["notes"],
        "targets": first["targets"],
        "other_tasks": first["other_tasks"],
        "variant_recipe": VARIANT_RECIPE,
        "seeds": per_seed,
        "bounds": {
            name: _mean_std([float(np.mean(list(s["bounds"][name].values()))) for s in per_seed])
            for name in ("pretrained", "individual")
        },
        "table": aggregate(per_seed),
        "seconds": round(time.perf_counter() - started, 1),
    }
    results["files"] = write_reports(results, Path(config.output_dir))
    return results


def _seed_result(config: FwPoolConfig, seed: int) -> dict[str, Any]:
    """One seed's result, saved as it finishes (``seeds/seed-<k>.json`` in the output
    directory) and loaded instead of recomputed when the same settings ran before with at
    least the methods asked for (the others are left out)."""
    path = Path(config.output_dir) / "seeds" / f"seed-{seed}.json"
    ignored = ("seeds", "progress", "methods")
    settings = {k: v for k, v in asdict(config).items() if k not in ignored}
    if path.exists():
        saved = json.loads(path.read_text())
        done = set(saved.get("methods", ()))
        if saved.get("settings") == json.loads(json.dumps(settings)) and done >= set(
            config.methods
        ):
            result = saved["result"]
            result["runs"] = [r for r in result["runs"] if r["method"] in config.methods]
            return result
    result = run_seed(config, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"settings": settings, "methods": list(config.methods), "result": result})
    )
    tmp.replace(path)
    return result


def _mean_std(values: Sequence[float]) -> list[float]:
    arr = np.asarray(values, dtype=float)
    return [float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0]


def aggregate(per_seed: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds of the mean target accuracy, per (series, pool size, method)."""
    cells: dict[tuple[str, int, str], list[float]] = {}
    for result in per_seed:
        for run in result["runs"]:
            key = (run["series"], run["pool_size"], run["method"])
            cells.setdefault(key, []).append(run["mean"])
    return [
        {"series": s, "pool_size": p, "method": m, "mean_std": _mean_std(v), "n": len(v)}
        for (s, p, m), v in cells.items()
    ]


def _label(task: Task, k: int, is_target: bool) -> str:
    return f"{'rel' if is_target else 'irr'}:{task.name}" + (f"#v{k}" if k else "")


# --------------------------------------------------------------------------------------------
# Reports


def markdown_table(results: Mapping[str, Any], kind: str = "irrelevant") -> str:
    rows = [r for r in results["table"] if r["series"] == kind]
    if not rows:
        return ""
    sizes = sorted({r["pool_size"] for r in rows})
    methods = [m for m in results["config"]["methods"] if any(r["method"] == m for r in rows)]
    pre, ind = results["bounds"]["pretrained"], results["bounds"]["individual"]
    n_targets = len(results["targets"])
    seeds = len(results["seeds"])
    head = " | ".join(f"pool {s} (+{s - n_targets} {kind})" for s in sizes)
    lines = [
        f"Mean accuracy (%) on the {n_targets} target tasks ({', '.join(results['targets'])}), "
        f"mean ± std over {seeds} seed(s); pretrained {_pct(pre)}, individual fine-tuned "
        f"{_pct(ind)}.",
        "",
        f"| Method | {head} |",
        "|---|" + "---|" * len(sizes),
    ]
    for method in methods:
        cells = []
        for size in sizes:
            hit = [r for r in rows if r["method"] == method and r["pool_size"] == size]
            cells.append(_pct(hit[0]["mean_std"]) if hit else "—")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(mean_std: Sequence[float]) -> str:
    return f"{100 * mean_std[0]:.1f} ± {100 * mean_std[1]:.1f}"


def fw_picks(results: Mapping[str, Any]) -> str:
    """How often FW's LMO picked a relevant model, the start, or an irrelevant one (all seeds)."""
    counts: dict[tuple[str, str, int], list[int]] = {}
    for result in results["seeds"]:
        for run in result["runs"]:
            if not run["fw_trace"]:
                continue
            picked = [c for it in run["fw_trace"] for sel in it["selected"].values() for c in sel]
            key = (run["method"], run["series"], run["pool_size"])
            got = [sum(c.startswith(p) for c in picked) for p in ("rel:", "initial", "irr:")]
            counts[key] = [a + b for a, b in zip(counts.get(key, [0, 0, 0]), got)]
    lines = ["| Method | pool | picks: relevant / initial / irrelevant |", "|---|---|---|"]
    for (method, series, size), got in counts.items():
        lines.append(f"| {LABELS[method]} | {series} {size} | " + " / ".join(map(str, got)) + " |")
    return "\n".join(lines)


def write_reports(results: dict[str, Any], out_dir: Path) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "json": str(out_dir / "fw_results.json"),
        "markdown": str(out_dir / "fw_results.md"),
        "plot": str(out_dir / "fw_accuracy_vs_pool.png"),
    }
    cfg = results["config"]
    md = ["# FW-Merging with irrelevant models", "", markdown_table(results, "irrelevant")]
    if any(r["series"] == "relevant" for r in results["table"]):
        md += ["", "## Adding relevant models", "", markdown_table(results, "relevant")]
    md += [
        "",
        "## What FW picked (candidates chosen over all iterations and seeds; layer-wise counts "
        "tensors)",
        "",
        fw_picks(results),
        "",
        "## Setup",
        "",
        f"- sources: {results['sources']}; targets: {', '.join(results['targets'])}; "
        f"irrelevant models from: {', '.join(results['other_tasks'])}; seeds "
        f"{', '.join(str(s['seed']) for s in results['seeds'])}",
        "- heads: fixed class-mean cosine heads (logits × 100); extra models beyond one per task: "
        f"{results['variant_recipe']}",
        f"- iteration settings replacing the presets': {results['settings']}; FW objective: "
        f"{cfg['n_labelled']} labelled train samples per target; entropy (soft, AdaMerging) on "
        f"the targets' {cfg['soft_unlabelled']} inputs",
        "- checkpoint caches: " + ", ".join(f"`{s['cache_dir']}`" for s in results["seeds"]),
        f"- time: {results['seconds']:.0f} s",
        *[f"- note: {n}" for n in results["notes"]],
    ]
    Path(files["markdown"]).write_text("\n".join(md) + "\n")
    plot(results, Path(files["plot"]))
    Path(files["json"]).write_text(json.dumps(results | {"files": files}, indent=2))
    return files


def plot(results: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = results["table"]
    kinds = [k for k in ("irrelevant", "relevant") if any(r["series"] == k for r in table)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = [r for r in table if r["series"] == kind]
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted(
                (r["pool_size"], 100 * r["mean_std"][0], 100 * r["mean_std"][1])
                for r in rows
                if r["method"] == method
            )
            x, y, err = zip(*pts)
            style = "-" if method.startswith("fw") else "--"
            ax.errorbar(x, y, yerr=err, fmt=style, marker="o", capsize=3, label=LABELS[method])
        for name, ls in (("pretrained", ":"), ("individual", "-.")):
            ax.axhline(100 * results["bounds"][name][0], color="grey", linestyle=ls, label=name)
        ax.set_xlabel(f"models in the pool (4 relevant + {kind} ones)")
        ax.set_ylabel("mean accuracy on the 4 target tasks (%)")
        ax.set_title(f"Adding {kind} models")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# CLI


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def add_fw_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``contmerge simulate fw``."""
    add_output_dir(parser, "contmerge-runs/fw, with --quick contmerge-runs/fw-quick")
    parser.add_argument(
        "--cache-dir", default=None, help=f"checkpoint cache (default: {default_cache_dir()})"
    )
    parser.add_argument(
        "--targets",
        default=None,
        help="comma-separated target tasks (default: the suite's first four)",
    )
    parser.add_argument(
        "--irrelevant",
        type=_ints,
        default=None,
        help="irrelevant models added, comma-separated (default 0,8,16; '' for none)",
    )
    parser.add_argument(
        "--relevant",
        type=_ints,
        default=(),
        help="relevant variants added, e.g. 8,16 (default: none)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, from {', '.join(LABELS)} (default: {', '.join(METHODS)})",
    )
    parser.add_argument("--n-labelled", type=int, default=100, help="labelled samples per target")
    parser.add_argument(
        "--max-iters", type=int, default=None, help="FW iterations (default: each preset's)"
    )
    parser.add_argument("--ada-iters", type=int, default=None, help="soft Adam steps (500)")
    parser.add_argument(
        "--adamerging-iters", type=int, default=None, help="AdaMerging start's Adam steps (500)"
    )
    parser.add_argument(
        "--soft-unlabelled",
        choices=("test", "train"),
        default="test",
        help="unlabelled inputs of the soft and AdaMerging entropy (default test, as the authors)",
    )
    parser.add_argument("--seeds", type=_ints, default=(0,), help="comma-separated (default 0)")
    parser.add_argument("--quick", action="store_true", help="small, fast setting (tests)")
    parser.add_argument("--digits-only", action="store_true",
                        help="ignore Fashion-MNIST even if installed")  # fmt: skip
    parser.add_argument("--fashion-dir", default=str(FASHION_DIR),
                        help="where Debian's dataset-fashion-mnist put its files")  # fmt: skip
    add_no_progress(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> FwPoolConfig:
    return FwPoolConfig(
        output_dir=args.output_dir
        or ("contmerge-runs/fw-quick" if args.quick else "contmerge-runs/fw"),
        cache_dir=args.cache_dir,
        targets=names_list(args.targets),
        irrelevant=args.irrelevant,
        relevant=tuple(args.relevant),
        methods=names_list(args.methods),
        n_labelled=args.n_labelled,
        max_iters=args.max_iters,
        ada_iters=args.ada_iters,
        adamerging_iters=args.adamerging_iters,
        soft_unlabelled=args.soft_unlabelled,
        seeds=tuple(args.seeds),
        quick=args.quick,
        use_fashion=False if args.digits_only else None,
        fashion_dir=args.fashion_dir,
        progress=not args.no_progress,
    )


def main_fw(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    results = run_fw_pool(config)
    print()
    print(markdown_table(results, "irrelevant"))
    if config.relevant:
        print()
        print(markdown_table(results, "relevant"))
    print(f"\ntime: {results['seconds']:.0f} s")
    for kind, path in results["files"].items():
        print(f"{kind:>8}: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m contmerge.simulations.fw_pool`` (the same options as the CLI command)."""
    parser = add_fw_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    return main_fw(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
