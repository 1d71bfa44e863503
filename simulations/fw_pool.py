"""FW-Merging's claim, checked: merge a pool of 4 relevant models plus 0, 8, 16 irrelevant ones.

Target tasks: four tasks of the suite (by default its first four, fixed before any run). Relevant
models: each target's independently fine-tuned backbone. Irrelevant models: backbones fine-tuned
on the *other* tasks of the suite. The suite has 8 tasks, so only 4 other tasks exist; to reach
16 irrelevant models each other task also gets extra fine-tunes with a different seed on a
different random 75 % of its training set ("variants"). Optionally, relevant variants (same recipe
on the target tasks) are added instead, for the paper's second claim.

Per pool: task arithmetic (λ = 0.3), TIES (the authors' batch form, λ = 0.3, top-20 %, sum), the
engine's continual TIES, and FW-Merging hard (task- and layer-wise) and soft, all with the
authors' defaults, plus the paper's ablation "soft without coefficient learning" (ada_iters 0).
``fw_hard_linear[_layer]`` (the paper's LMO ⟨g, s⟩ instead of the code's cosine) run only when
asked for with ``--methods``. Everything is scored on the target tasks, each with its own frozen
head. The FW objective uses 100 labelled training samples per target task; the soft variant's
entropy uses unlabelled training images of the targets (disjoint from those 100), not test images
(the authors use test inputs, i.e. test-time adaptation; ``--soft-unlabelled test`` does that).

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

METHODS = (
    "task_arithmetic", "ties", "c_ties", "fw_hard", "fw_hard_layer", "fw_soft", "fw_soft_fixed",
)  # fmt: skip
#: diagnostics, run only when asked for with --methods
EXTRA_METHODS = ("fw_hard_linear", "fw_hard_linear_layer")
LABELS = {
    "task_arithmetic": "Task Arithmetic",
    "ties": "TIES (batch)",
    "c_ties": "C. TIES (engine)",
    "fw_hard": "FW-hard (task)",
    "fw_hard_layer": "FW-hard (layer)",
    "fw_soft": "FW-soft (task)",
    "fw_soft_fixed": "FW-soft, no coefficient learning (paper's ablation)",
    "fw_hard_linear": "FW-hard (task), paper's LMO ⟨g, s⟩",
    "fw_hard_linear_layer": "FW-hard (layer), paper's LMO ⟨g, s⟩",
}
VARIANT_RECIPE = "fw-variant-v1: seed derived from (seed, task, k); random 75 % of the train split"


@dataclass
class FwPoolConfig:
    """One run. ``None`` means: the default of the mode (quick or full)."""

    output_dir: str = "contmerge-runs/fw"
    cache_dir: str | None = None
    targets: tuple[str, ...] | None = None  # None: the suite's first four tasks
    irrelevant: tuple[int, ...] | None = None  # (0, 8, 16); quick: (0, 4)
    relevant: tuple[int, ...] = ()  # extra relevant variants, e.g. (4, 8); off by default
    methods: tuple[str, ...] = METHODS
    n_labelled: int = 100  # per target task, the authors' dataset_size
    max_iters: int | None = None  # 10 (authors); quick: 3
    ada_iters: int | None = None  # 500 (authors); quick: 40
    soft_unlabelled: str = "train"  # or "test" (the authors' test-time adaptation)
    seed: int = 0
    quick: bool = False
    use_fashion: bool | None = None
    fashion_dir: str = str(FASHION_DIR)
    progress: bool = True

    def base_config(self) -> ContinualConfig:
        # the continual scenario's data and training settings: its checkpoint cache is shared
        return ContinualConfig(
            quick=self.quick,
            seed=self.seed,
            use_fashion=self.use_fashion,
            fashion_dir=self.fashion_dir,
            cache_dir=self.cache_dir,
        )

    def counts(self) -> tuple[int, ...]:
        if self.irrelevant is not None:
            return tuple(self.irrelevant)
        return (0, 4) if self.quick else (0, 8, 16)

    def iters(self) -> tuple[int, int]:
        return (
            self.max_iters if self.max_iters is not None else (3 if self.quick else 10),
            self.ada_iters if self.ada_iters is not None else (40 if self.quick else 500),
        )


# --------------------------------------------------------------------------------------------
# The pool


def _seed(*parts: object) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def variant_checkpoint(cache: CheckpointCache, task: Task, k: int, seed: int) -> Path:
    """Fine-tune number k of ``task`` (k = 0: the cache's own independent checkpoint)."""
    if k == 0:
        return cache.independent(task.name)
    path = cache.root / "fw-variants" / f"{task.name}-v{k}.safetensors"
    if path.exists():
        return path
    gen = torch.Generator().manual_seed(_seed(seed, "fw-subset", task.name, k))
    keep = torch.randperm(len(task.x_train), generator=gen)[: int(0.75 * len(task.x_train))]
    subset = replace(task, x_train=task.x_train[keep], y_train=task.y_train[keep])
    state = finetune_backbone(
        cache.base(),
        load_safetensors(cache.head(task.name)),
        subset,
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
# The run


def make_objective(
    targets: Sequence[Task],
    heads: Mapping[str, StateDict],
    model_cfg: ModelConfig,
    n_labelled: int,
    soft_unlabelled: str,
    seed: int,
):
    """100 labelled train samples per target; the rest of its train split (or its test inputs)
    as the soft variant's unlabelled data."""
    from contmerge.strategies.frank_wolfe import ClassifierObjective

    labelled, unlabelled = {}, {}
    for task in targets:
        gen = torch.Generator().manual_seed(_seed(seed, "fw-labelled", task.name))
        perm = torch.randperm(len(task.x_train), generator=gen)
        pick, rest = perm[:n_labelled], perm[n_labelled:]
        labelled[task.name] = (task.x_train[pick], task.y_train[pick])
        unlabelled[task.name] = task.x_test if soft_unlabelled == "test" else task.x_train[rest]
    heads_mod = {t.name: head_from_state(heads[t.name], model_cfg) for t in targets}
    return ClassifierObjective(
        Backbone(model_cfg), heads_mod, labelled, unlabelled, seed=_seed(seed, "fw-ada")
    )


def run_fw(
    method: str,
    base_path: Path,
    paths: Sequence[Path],
    labels: Sequence[str],
    objective: Any,
    iters: tuple[int, int],
) -> tuple[StateDict, list[dict[str, Any]]]:
    from contmerge.strategies.frank_wolfe import FrankWolfeMerger

    variant = "soft" if method.startswith("fw_soft") else "hard"
    granularity = "layer" if method.endswith("_layer") else "task"
    lmo = "inner_product" if "linear" in method else "cosine"
    ada_iters = 0 if method == "fw_soft_fixed" else iters[1]
    pool = dict(zip(labels, paths))
    with FrankWolfeMerger(
        base_path, pool, objective, variant, granularity,
        lmo=lmo, max_iters=iters[0], ada_iters=ada_iters,
    ) as fw:  # fmt: skip
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
        return fw.merged(), trace


def run_fw_pool(config: FwPoolConfig) -> dict[str, Any]:
    """Train (or load cached) the pool, merge every pool size with every method, write reports."""
    started = time.perf_counter()
    unknown = [m for m in config.methods if m not in LABELS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(LABELS)}")
    base_cfg = config.base_config()
    data_cfg, train_cfg, model_cfg = base_cfg.data_config(), base_cfg.train_config(), ModelConfig()
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, train_cfg.threads)))
    try:
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
        heads = {t.name: load_safetensors(cache.head(t.name)) for t in suite.tasks}

        relevant = [(t, 0) for t in targets]
        series = [("irrelevant", n, interleaved(others, n, 0)) for n in config.counts()]
        series += [("relevant", n, interleaved(targets, n, 1)) for n in config.relevant]
        needed = {(t.name, k): (t, k) for _, _, extra in series for t, k in relevant + extra}
        paths: dict[tuple[str, int], Path] = {}
        for key, (task, k) in tqdm(
            needed.items(), desc="pool checkpoints", disable=not config.progress
        ):
            paths[key] = variant_checkpoint(cache, task, k, config.seed)
        t_pool = time.perf_counter()

        base = load_safetensors(base_path)
        evaluator = Evaluator(targets, heads, model_cfg)
        bounds = {
            "pretrained": evaluator.accuracy(base, target_names),
            "individual": {
                t.name: evaluator.accuracy(load_safetensors(paths[(t.name, 0)]), [t.name])[t.name]
                for t in targets
            },
        }
        objective = make_objective(
            targets, heads, model_cfg, config.n_labelled, config.soft_unlabelled, config.seed
        )
        runs = []
        jobs = [(s, m) for s in series for m in config.methods]
        bar = tqdm(jobs, desc="merge + evaluate", disable=not config.progress)
        for (kind, count, extra), method in bar:
            members = relevant + extra
            labels = [_label(t, k, t.name in target_names) for t, k in members]
            pool_paths = [paths[(t.name, k)] for t, k in members]
            bar.set_postfix_str(f"{kind}+{count} {method}")
            t0 = time.perf_counter()
            trace: list[dict[str, Any]] = []
            if method == "task_arithmetic":
                merged = engine_merge(base, "task_arithmetic", pool_paths)
            elif method == "c_ties":
                merged = engine_merge(base, "ties", pool_paths)
            elif method == "ties":
                merged = batch_ties(base, pool_paths)
            else:
                merged, trace = run_fw(
                    method, base_path, pool_paths, labels, objective, config.iters()
                )
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
                }
            )
        t_merge = time.perf_counter()
    finally:
        torch.set_num_threads(prev_threads)

    results = {
        "scenario": "fw_pool",
        "config": asdict(config),
        "data": asdict(data_cfg),
        "train": train_cfg.to_dict(),
        "sources": suite.sources,
        "notes": suite.notes,
        "targets": target_names,
        "other_tasks": [t.name for t in others],
        "variant_recipe": VARIANT_RECIPE,
        "iters": {"max_iters": config.iters()[0], "ada_iters": config.iters()[1]},
        "cache_dir": str(cache.root),
        "bounds": bounds,
        "runs": runs,
        "timing_s": {
            "pool": round(t_pool - started, 1),
            "merge_and_eval": round(t_merge - t_pool, 1),
        },
    }
    results["files"] = write_reports(results, Path(config.output_dir))
    return results


def _label(task: Task, k: int, is_target: bool) -> str:
    return f"{'rel' if is_target else 'irr'}:{task.name}" + (f"#v{k}" if k else "")


# --------------------------------------------------------------------------------------------
# Reports


def markdown_table(results: Mapping[str, Any], kind: str = "irrelevant") -> str:
    runs = [r for r in results["runs"] if r["series"] == kind]
    if not runs:
        return ""
    sizes = sorted({r["pool_size"] for r in runs})
    methods = list(dict.fromkeys(r["method"] for r in runs))
    pre = np.mean(list(results["bounds"]["pretrained"].values()))
    ind = np.mean(list(results["bounds"]["individual"].values()))
    n_targets = len(results["targets"])
    head = " | ".join(f"pool {s} (+{s - n_targets} {kind})" for s in sizes)
    lines = [
        f"Mean accuracy (%) on the {len(results['targets'])} target tasks "
        f"({', '.join(results['targets'])}); pretrained {100 * pre:.1f}, "
        f"individual fine-tuned {100 * ind:.1f}.",
        "",
        f"| Method | {head} |",
        "|---|" + "---|" * len(sizes),
    ]
    for method in methods:
        cells = []
        for size in sizes:
            hit = [r for r in runs if r["method"] == method and r["pool_size"] == size]
            cells.append(f"{100 * hit[0]['mean']:.1f}" if hit else "—")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fw_picks(results: Mapping[str, Any]) -> str:
    """How often FW's LMO picked a relevant model, the start, or an irrelevant one."""
    lines = ["| Method | pool | picks: relevant / initial / irrelevant |", "|---|---|---|"]
    for run in results["runs"]:
        if not run["fw_trace"]:
            continue
        picked = [c for it in run["fw_trace"] for sel in it["selected"].values() for c in sel]
        counts = [sum(c.startswith(p) for c in picked) for p in ("rel:", "initial", "irr:")]
        lines.append(
            f"| {LABELS[run['method']]} | {run['series']} {run['pool_size']} | "
            + " / ".join(map(str, counts))
            + " |"
        )
    return "\n".join(lines)


def write_reports(results: dict[str, Any], out_dir: Path) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "json": str(out_dir / "fw_results.json"),
        "markdown": str(out_dir / "fw_results.md"),
        "plot": str(out_dir / "fw_accuracy_vs_pool.png"),
    }
    md = ["# FW-Merging with irrelevant models", "", markdown_table(results, "irrelevant")]
    if any(r["series"] == "relevant" for r in results["runs"]):
        md += ["", "## Adding relevant models", "", markdown_table(results, "relevant")]
    md += [
        "",
        "## What FW picked (candidates chosen over all iterations; layer-wise counts tensors)",
        "",
        fw_picks(results),
        "",
        "## Setup",
        "",
        f"- sources: {results['sources']}; targets: {', '.join(results['targets'])}; "
        f"irrelevant models from: {', '.join(results['other_tasks'])}",
        f"- extra models beyond one per task: {results['variant_recipe']}",
        f"- FW: max_iters {results['iters']['max_iters']}, soft ada_iters "
        f"{results['iters']['ada_iters']}; objective: {results['config']['n_labelled']} "
        f"labelled train samples per target; soft entropy on "
        f"{results['config']['soft_unlabelled']} inputs",
        f"- checkpoint cache: `{results['cache_dir']}`",
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

    kinds = [
        k for k in ("irrelevant", "relevant") if any(r["series"] == k for r in results["runs"])
    ]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        runs = [r for r in results["runs"] if r["series"] == kind]
        for method in dict.fromkeys(r["method"] for r in runs):
            pts = sorted((r["pool_size"], 100 * r["mean"]) for r in runs if r["method"] == method)
            style = "-" if method.startswith("fw") else "--"
            ax.plot(*zip(*pts), style, marker="o", label=LABELS[method])
        for name, ls in (("pretrained", ":"), ("individual", "-.")):
            ax.axhline(
                100 * np.mean(list(results["bounds"][name].values())),
                color="grey",
                linestyle=ls,
                label=name,
            )
        ax.set_xlabel(f"models in the pool (4 relevant + {kind} ones)")
        ax.set_ylabel("mean accuracy on the 4 target tasks (%)")
        ax.set_title(f"Adding {kind} models")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
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
        help="irrelevant models added, comma-separated (default 0,8,16)",
    )
    parser.add_argument(
        "--relevant",
        type=_ints,
        default=(),
        help="relevant variants added, e.g. 4,8 (default: none)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, from {', '.join(LABELS)} (default: all but the last two)",
    )
    parser.add_argument("--n-labelled", type=int, default=100, help="labelled samples per target")
    parser.add_argument("--max-iters", type=int, default=None, help="FW iterations (10)")
    parser.add_argument("--ada-iters", type=int, default=None, help="soft Adam steps (500)")
    parser.add_argument(
        "--soft-unlabelled",
        choices=("train", "test"),
        default="train",
        help="inputs of the soft variant's entropy (authors: test)",
    )
    parser.add_argument("--seed", type=int, default=0, help="data split and training seed")
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
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        n_labelled=args.n_labelled,
        max_iters=args.max_iters,
        ada_iters=args.ada_iters,
        soft_unlabelled=args.soft_unlabelled,
        seed=args.seed,
        quick=args.quick,
        use_fashion=False if args.digits_only else None,
        fashion_dir=args.fashion_dir,
        progress=not args.no_progress,
    )


def main_fw(args: argparse.Namespace) -> int:
    results = run_fw_pool(config_from_args(args))
    print()
    print(markdown_table(results, "irrelevant"))
    if config_from_args(args).relevant:
        print()
        print(markdown_table(results, "relevant"))
    t = results["timing_s"]
    print(f"\ntime: pool {t['pool']:.0f} s, merge+eval {t['merge_and_eval']:.0f} s")
    for kind, path in results["files"].items():
        print(f"{kind:>8}: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m contmerge.simulations.fw_pool`` (the same options as the CLI command)."""
    parser = add_fw_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    return main_fw(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
