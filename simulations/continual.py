"""Continual-merging scenario: fine-tuned backbones arrive one at a time, in random orders.

For every strategy spec and every arrival order, the fine-tuned backbones (independent or
sequential, per spec) are folded into a merger one by one; after each arrival the merged backbone
is scored on the tasks seen so far (OPCM's protocol). Reports ACC and BWT as mean ± std over the
orders, with the pretrained backbone and the individually fine-tuned models as bounds, as JSON, a
markdown table and a PNG plot.

``run_continual(config)`` is the entry point; ``add_continual_arguments`` / ``main_continual``
and ``add_demo_arguments`` / ``main_demo`` are the CLI halves wired into ``contmerge``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import FASHION_DIR, DataConfig, load_suite
from .evaluate import Evaluator, acc_bwt, seen_mean, table_from_fixed
from .models import ModelConfig, StateDict
from .options import add_no_progress, add_output_dir, names_list, positive_int
from .regime import regime_markdown
from .train import CheckpointCache, Checkpoints, TrainConfig, load_safetensors

CHECKPOINT_KINDS = ("independent", "sequential")
MODELS = ("mlp", "minilm", "vit-s", "smollm2-lora")
NO_MERGE = "latest"  # pseudo-strategy: the last arrival itself (sequential FT = continual FT)


class MergerLike(Protocol):
    def fold(self, source: Any) -> Any: ...
    def emit_state_dict(self) -> dict[str, torch.Tensor]: ...


MergeFn = Callable[[StateDict, str, Mapping[str, Any]], MergerLike]


def engine_merge_fn(base: StateDict, strategy: str, hparams: Mapping[str, Any]) -> MergerLike:
    """The real engine, state kept in memory: ``contmerge.Merger(base, strategy, None,
    settings=hparams)``."""
    from contmerge import Merger  # lazy: the data/training half must import without the engine

    return Merger(base=base, strategy=strategy, state_dir=None, settings=dict(hparams))


class _Latest:
    """No merging at all: emits the most recent arrival (continual fine-tuning's final model)."""

    def __init__(self, load: Callable[[Any], StateDict]) -> None:
        self.load = load
        self.last: StateDict | None = None

    def fold(self, source: Any) -> None:
        self.last = self.load(source)

    def emit_state_dict(self) -> StateDict:
        if self.last is None:
            raise RuntimeError("nothing folded yet")
        return self.last


@dataclass(frozen=True)
class StrategySpec:
    """One row of the results: a strategy (engine spec string) on one kind of checkpoints."""

    label: str
    strategy: str  # e.g. "opcm", "ties(scaling_factor=0.3)", or NO_MERGE
    checkpoints: str = "independent"  # or "sequential" (MagMax's recipe)
    hparams: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.checkpoints not in CHECKPOINT_KINDS:
            raise ValueError(f"checkpoints must be one of {CHECKPOINT_KINDS}")


# Hyper-parameters are the engine's defaults, which follow the papers (C.TA λ=0.3, C.TIES λ=0.3
# with top-20 % trim, MagMax λ=0.5, OPCM α=0.5); nothing here is tuned on this scenario.
DEFAULT_STRATEGIES: tuple[StrategySpec, ...] = (
    StrategySpec("Average", "average"),
    StrategySpec("C. Task Arithmetic", "task_arithmetic"),
    StrategySpec("C. TIES", "ties"),
    StrategySpec("MagMax-Ind", "magmax"),
    StrategySpec("MagMax-Seq", "magmax", "sequential"),
    StrategySpec("OPCM", "opcm"),
    StrategySpec("C. fine-tuned (no merge)", NO_MERGE, "sequential"),
)
_LABELS = {
    ("average", "independent"): "Average",
    ("task_arithmetic", "independent"): "C. Task Arithmetic",
    ("ties", "independent"): "C. TIES",
    ("magmax", "independent"): "MagMax-Ind",
    ("magmax", "sequential"): "MagMax-Seq",
    ("opcm", "independent"): "OPCM",
    (NO_MERGE, "sequential"): "C. fine-tuned (no merge)",
}


def parse_strategy_arg(text: str) -> StrategySpec:
    """CLI form ``SPEC[@independent|@sequential][=LABEL]``, e.g. ``magmax@sequential``,
    ``ties(scaling_factor=0.1)``, ``opcm(alpha=0.3)=OPCM a0.3``; SPEC goes to the engine as is."""
    depth, cut = 0, None
    for i, ch in enumerate(text):  # a label starts at the first '=' outside parentheses
        depth += (ch == "(") - (ch == ")")
        if ch == "=" and depth == 0:
            cut = i
            break
    spec, label = (text[:cut], text[cut + 1 :]) if cut is not None else (text, "")
    spec, _, kind = spec.partition("@")
    spec, kind = spec.strip(), kind.strip() or "independent"
    if not spec:
        raise ValueError(f"empty strategy in {text!r}")
    default = _LABELS.get((spec, kind), spec if kind == "independent" else f"{spec} ({kind})")
    return StrategySpec(label=label.strip() or default, strategy=spec, checkpoints=kind)


def default_cache_dir() -> Path:
    root = os.environ.get("CONTMERGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "contmerge"
    )
    return Path(root) / "simulations"


@dataclass
class ContinualConfig:
    """Everything one scenario run depends on. ``None`` means: the default of the mode."""

    output_dir: str = "contmerge-runs/continual"
    cache_dir: str | None = None  # None: $CONTMERGE_CACHE/simulations or ~/.cache/contmerge/...
    strategies: tuple[StrategySpec, ...] = DEFAULT_STRATEGIES
    num_orders: int | None = None  # 10 (as in OPCM/MINGLE), 5 in quick mode
    order_seed: int = 42  # order k is the permutation drawn with seed order_seed + k
    tasks: tuple[str, ...] | None = None  # None: the 8 default tasks
    seed: int = 0  # data split and training seed
    epochs: int | None = None  # fine-tuning epochs per task
    pretrain_epochs: int | None = None
    n_train: int | None = None
    n_test: int | None = None
    quick: bool = False  # fewer samples/epochs/orders: the < 5 min demo
    use_fashion: bool | None = None  # None: when installed
    fashion_dir: str = str(FASHION_DIR)
    progress: bool = True
    model: str = "mlp"  # mlp | minilm | vit-s | smollm2-lora
    steps: int | None = None  # real models: optimizer steps per task (None: RealConfig's)
    real_overrides: Mapping[str, Any] = field(default_factory=dict)  # other RealConfig fields

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; one of {', '.join(MODELS)}")

    def real_config(self) -> Any:
        """The ``RealConfig`` of a real-model scenario (``None`` fields keep its defaults)."""
        from .real_continual import RealConfig

        given = {"tasks": tuple(self.tasks) if self.tasks else None, "steps": self.steps,
                 "n_train": self.n_train, "n_test": self.n_test}  # fmt: skip
        kwargs = {k: v for k, v in given.items() if v is not None}
        return RealConfig(model=self.model, seed=self.seed, **kwargs, **dict(self.real_overrides))

    def orders_count(self) -> int:
        # 10 orders as OPCM/MINGLE for the MLP; 5 (the minimum) for the real models
        short = self.quick or self.model != "mlp"
        n = self.num_orders if self.num_orders is not None else (5 if short else 10)
        if n < 1:
            raise ValueError("num_orders must be >= 1")
        return n

    def data_config(self) -> DataConfig:
        quick = DataConfig(n_train=1000, n_test=500, n_pretrain=5000)
        full = DataConfig()
        d = quick if self.quick else full
        return replace(
            d,
            seed=self.seed,
            n_train=self.n_train or d.n_train,
            n_test=self.n_test or d.n_test,
            use_fashion=self.use_fashion,
            fashion_dir=self.fashion_dir,
            tasks=tuple(self.tasks) if self.tasks else None,
        )

    def train_config(self) -> TrainConfig:
        d = TrainConfig(pretrain_epochs=4, finetune_epochs=5) if self.quick else TrainConfig()
        return replace(
            d,
            seed=self.seed,
            finetune_epochs=self.epochs if self.epochs is not None else d.finetune_epochs,
            pretrain_epochs=(
                self.pretrain_epochs if self.pretrain_epochs is not None else d.pretrain_epochs
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["strategies"] = [asdict(s) | {"hparams": dict(s.hparams)} for s in self.strategies]
        out["real_overrides"] = dict(self.real_overrides)
        return out


def make_orders(names: Sequence[str], count: int, seed: int) -> list[list[str]]:
    """``count`` random arrival orders; order k uses seed + k (MINGLE uses seeds 42-51)."""
    return [
        [names[i] for i in np.random.default_rng(seed + k).permutation(len(names))]
        for k in range(count)
    ]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    # Population std (numpy's default) over orders, as the papers' "± std over orders".
    return float(np.mean(values)), float(np.std(values))


# --------------------------------------------------------------------------------------------
# The run


class MlpScenario:
    """The small-MLP scenario behind the ``Scenario`` interface the runner uses."""

    recipe: dict[str, Any]

    def __init__(self, config: ContinualConfig, cache_dir: Path) -> None:
        data_cfg, train_cfg, self.model_cfg = config.data_config(), config.train_config(), \
            ModelConfig()  # fmt: skip
        self.suite = load_suite(data_cfg)
        self.names = self.suite.names
        self.notes = self.suite.notes
        self.cache = CheckpointCache(self.suite, data_cfg, self.model_cfg, train_cfg, cache_dir,
                                     progress=config.progress)  # fmt: skip
        self.root = self.cache.root
        self.recipe = {
            "optimizer": f"AdamW(lr={train_cfg.finetune_lr}, weight_decay="
            f"{train_cfg.weight_decay}), one-cycle schedule",
            "epochs_per_task": train_cfg.finetune_epochs,
            "batch_size": train_cfg.batch_size,
            "loss": "cross-entropy on 100·cos(feature, fixed class-mean head)",
            "trained": "every backbone weight (784→256→256→64 MLP pretrained on Fashion-MNIST)",
        }
        self.ckpts: Checkpoints | None = None

    def sources(self) -> str:
        return self.suite.sources

    def prepare(self, orders: Sequence[Sequence[str]], sequential: bool) -> None:
        self.ckpts = self.cache.prepare(orders, sequential=sequential)
        self.evaluator = Evaluator(self.suite.tasks, self.ckpts.head_states(), self.model_cfg)

    def base_state(self) -> StateDict:
        return self.cache.base()

    def paths(self, kind: str, order: Sequence[str]) -> list[Path]:
        assert self.ckpts is not None, "prepare() first"
        return self.ckpts.paths(kind, order)

    def full_state(self, source: Any) -> StateDict:
        return load_safetensors(Path(source)) if isinstance(source, str | Path) else source

    def accuracy(self, state: Mapping[str, torch.Tensor], names: Sequence[str]
                 ) -> dict[str, float]:  # fmt: skip
        return self.evaluator.accuracy(state, names)


def _fold_input(scenario: Any, path: Path) -> Any:
    """What the merger receives: a LoRA adapter directory as is (the engine reads its delta);
    a checkpoint file as its in-memory state dict (the scenario measures merging, not file
    sniffing; the engine's path input is covered by its own tests)."""
    return path if Path(path).is_dir() else scenario.full_state(path)


def build_scenario(config: ContinualConfig, cache_dir: Path) -> Any:
    """The MLP scenario, or a real-model one (``real_continual``)."""
    if config.model == "mlp":
        return MlpScenario(config, cache_dir)
    from .real_continual import RealScenario

    return RealScenario(config.real_config(), cache_dir, progress=config.progress)


def run_continual(config: ContinualConfig, merge_fn: MergeFn | None = None) -> dict[str, Any]:
    """Train (or load cached) checkpoints, stream them through each strategy, write reports."""
    from .regime import lora_agreement, regime_diagnostics, ta_beats_average

    merge_fn = merge_fn or engine_merge_fn
    t_start = time.perf_counter()
    out_dir = Path(config.output_dir)
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: a second thread was measured slower, not faster
    try:
        scenario = build_scenario(config, cache_dir)
        out_dir.mkdir(parents=True, exist_ok=True)  # after the settings are known to be valid
        names = list(scenario.names)
        orders = make_orders(names, config.orders_count(), config.order_seed)
        print_recipe(config, scenario)
        t_data = time.perf_counter()

        need_seq = any(s.checkpoints == "sequential" for s in config.strategies)
        scenario.prepare(orders, need_seq)
        t_train = time.perf_counter()

        base = scenario.base_state()
        finetuned = {n: scenario.full_state(scenario.paths("independent", [n])[0]) for n in names}
        ref = {
            "pretrained": scenario.accuracy(base, names),
            "individual": {n: scenario.accuracy(finetuned[n], [n])[n] for n in names},
        }
        runs, finals = stream_strategies(scenario, config, orders, base, ref, merge_fn)
        t_merge = time.perf_counter()
        diagnostics = regime_diagnostics(scenario, base, finetuned, finals, names, merge_fn,
                                         progress=config.progress)  # fmt: skip
        if config.model.endswith("-lora"):
            diagnostics["lora_vs_merge_and_unload"] = lora_agreement(
                scenario, base, config.strategies, orders[0], merge_fn
            )
        t_diag = time.perf_counter()
    finally:
        torch.set_num_threads(prev_threads)

    results = _summarise(config, scenario.sources(), getattr(scenario, "notes", []), names,
                         orders, ref, runs)  # fmt: skip
    results["model_name"] = config.model
    results["recipe"] = scenario.recipe
    diagnostics["ta_beats_average"] = ta_beats_average(results)
    results["diagnostics"] = diagnostics
    results["cache_dir"] = str(scenario.root)
    results["trained_now"] = getattr(scenario, "trainings", None)  # None: the MLP's own counter
    results["timing_s"] = {
        "data": round(t_data - t_start, 2),
        "training_or_cache": round(t_train - t_data, 2),
        "merge_and_eval": round(t_merge - t_train, 2),
        "diagnostics": round(t_diag - t_merge, 2),
    }
    results["files"] = write_reports(results, out_dir)
    results["timing_s"]["total"] = round(time.perf_counter() - t_start, 2)
    # Rewrite the JSON so it carries the final total time too.
    Path(results["files"]["json"]).write_text(json.dumps(results, indent=2))
    return results


def print_recipe(config: ContinualConfig, scenario: Any) -> None:
    """The fixed fine-tuning recipe, stated before anything runs."""
    print(f"continual merging, model {config.model}: {len(scenario.names)} tasks "
          f"({', '.join(scenario.names)}), {config.orders_count()} orders", flush=True)  # fmt: skip
    for key, value in scenario.recipe.items():
        print(f"  {key}: {value}", flush=True)


def stream_strategies(
    scenario: Any,
    config: ContinualConfig,
    orders: Sequence[Sequence[str]],
    base: StateDict,
    ref: Mapping[str, Mapping[str, float]],
    merge_fn: MergeFn,
) -> tuple[dict[str, dict[str, Any]], dict[str, StateDict]]:
    """Every strategy over every order, scored after every arrival on the tasks seen so far.

    Returns the runs and, per strategy, the final merge of the first order (for diagnostics).
    """
    individual = ref["individual"]
    runs: dict[str, dict[str, Any]] = {}
    finals: dict[str, StateDict] = {}
    jobs = [(s, k) for s in config.strategies for k in range(len(orders))]
    bar = tqdm(jobs, desc="merge + evaluate", disable=not config.progress)
    for spec, k in bar:
        bar.set_postfix_str(spec.label)
        order = list(orders[k])
        merger = (
            _Latest(scenario.full_state) if spec.strategy == NO_MERGE
            else merge_fn(base, spec.strategy, spec.hparams)
        )  # fmt: skip
        table: list[list[float]] = []
        for t, path in enumerate(scenario.paths(spec.checkpoints, order)):
            merger.fold(_fold_input(scenario, path))
            merged = merger.emit_state_dict()
            acc = scenario.accuracy(merged, order[: t + 1])
            table.append([acc[n] for n in order[: t + 1]])
        if k == 0:
            finals[spec.label] = {n: v.detach().clone() for n, v in merged.items()}
        close = getattr(merger, "close", None)
        if callable(close):
            close()
        a, b = acc_bwt(table)
        norm = [[a_i / max(individual[n], 1e-12) for a_i, n in zip(row, order)] for row in table]
        run = runs.setdefault(
            spec.label,
            {
                "strategy": spec.strategy,
                "checkpoints": spec.checkpoints,
                "hparams": dict(spec.hparams),
                "per_order": [],
            },
        )
        run["per_order"].append(
            {
                "order": order,
                "acc_table": table,
                "acc": a,
                "bwt": b,
                "norm_acc": float(np.mean(norm[-1])),
                "seen_mean": seen_mean(table),
                "norm_seen_mean": seen_mean(norm),
            }
        )
    return runs, finals


def _summarise(
    config: ContinualConfig,
    sources: str,
    notes: list[str],
    names: list[str],
    orders: list[list[str]],
    ref: dict[str, dict[str, float]],
    runs: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    pre, ind = ref["pretrained"], ref["individual"]
    for label, per_task, kind in (
        ("Pretrained", pre, "—"),
        ("Fine-tuned (individual, upper bound)", ind, "independent"),
    ):
        normed = {n: per_task[n] / max(ind[n], 1e-12) for n in names}
        rows.append(
            {
                "method": label,
                "checkpoints": kind,
                "acc_mean": float(np.mean([per_task[n] for n in names])),
                "acc_std": 0.0,
                "norm_acc_mean": float(np.mean(list(normed.values()))),
                "norm_acc_std": 0.0,
                "bwt_mean": None,
                "bwt_std": None,
                "final_per_task": dict(per_task),
                "curve_mean": _curve([seen_mean(table_from_fixed(per_task, o)) for o in orders]),
                "curve_std": _curve([seen_mean(table_from_fixed(per_task, o)) for o in orders], 1),
                "norm_curve_mean": _curve([seen_mean(table_from_fixed(normed, o)) for o in orders]),
                "norm_curve_std": _curve(
                    [seen_mean(table_from_fixed(normed, o)) for o in orders], 1
                ),
            }
        )
    for label, run in runs.items():
        per = run["per_order"]
        acc_m, acc_s = _mean_std([p["acc"] for p in per])
        bwt_m, bwt_s = _mean_std([p["bwt"] for p in per])
        norm_m, norm_s = _mean_std([p["norm_acc"] for p in per])
        final = {n: float(np.mean([p["acc_table"][-1][p["order"].index(n)] for p in per]))
                 for n in names}  # fmt: skip
        rows.append(
            {
                "method": label,
                "checkpoints": run["checkpoints"],
                "strategy": run["strategy"],
                "acc_mean": acc_m,
                "acc_std": acc_s,
                "bwt_mean": bwt_m,
                "bwt_std": bwt_s,
                "norm_acc_mean": norm_m,
                "norm_acc_std": norm_s,
                "final_per_task": final,
                "curve_mean": _curve([p["seen_mean"] for p in per]),
                "curve_std": _curve([p["seen_mean"] for p in per], 1),
                "norm_curve_mean": _curve([p["norm_seen_mean"] for p in per]),
                "norm_curve_std": _curve([p["norm_seen_mean"] for p in per], 1),
            }
        )
    return {
        "scenario": "continual",
        "config": config.to_dict(),
        "data": asdict(config.data_config()) if config.model == "mlp" else None,
        "train": config.train_config().to_dict() if config.model == "mlp" else None,
        "model": ModelConfig().to_dict() if config.model == "mlp" else None,
        "real": config.real_config().to_dict() if config.model != "mlp" else None,
        "sources": sources,
        "notes": notes,
        "tasks": names,
        "orders": orders,
        "bounds": ref,
        "summary": rows,
        "runs": runs,
    }


def _curve(curves: list[list[float]], which: int = 0) -> list[float]:
    arr = np.asarray(curves, dtype=float)
    return (arr.std(axis=0) if which else arr.mean(axis=0)).tolist()


# --------------------------------------------------------------------------------------------
# Reports


def _pct(mean: float | None, std: float | None = None) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def markdown_table(results: Mapping[str, Any]) -> str:
    """Rows: bounds then strategies; ACC and BWT in %, mean ± std over orders."""
    n_orders = len(results["orders"])
    lines = [
        f"Continual merging, model {results.get('model_name', 'mlp')} — "
        f"{len(results['tasks'])} tasks ({results['sources']}), "
        f"{n_orders} arrival orders; ACC/BWT in %, mean ± std over orders.",
        "",
        "| Method | Checkpoints | ACC | BWT | Normalised ACC |",
        "|---|---|---|---|---|",
    ]
    for row in results["summary"]:
        is_bound = row["bwt_mean"] is None
        acc = _pct(row["acc_mean"]) if is_bound else _pct(row["acc_mean"], row["acc_std"])
        bwt = "—" if is_bound else _pct(row["bwt_mean"], row["bwt_std"])
        norm = (_pct(row["norm_acc_mean"]) if is_bound
                else _pct(row["norm_acc_mean"], row["norm_acc_std"]))  # fmt: skip
        lines.append(f"| {row['method']} | {row['checkpoints']} | {acc} | {bwt} | {norm} |")
    return "\n".join(lines)


def per_task_table(results: Mapping[str, Any]) -> str:
    names = results["tasks"]
    lines = [
        "| Method | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for row in results["summary"]:
        cells = " | ".join(f"{100 * row['final_per_task'][n]:.1f}" for n in names)
        lines.append(f"| {row['method']} | {cells} |")
    return "\n".join(lines)


def write_reports(results: dict[str, Any], out_dir: Path) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": str(out_dir / "results.json"),
        "markdown": str(out_dir / "results.md"),
        "plot": str(out_dir / "accuracy_vs_merged.png"),
    }
    md = [
        "# Continual model merging",
        "",
        markdown_table(results),
        "",
        "## Final accuracy per task (%, mean over orders)",
        "",
        per_task_table(results),
        "",
        "## Setup",
        "",
        f"- tasks: {', '.join(results['tasks'])}",
        f"- sources: {results['sources']}; checkpoint cache: `{results.get('cache_dir', '')}`",
        "- heads: the pretrained model's normalised class-mean features, cosine logits × 100;",
        "  fixed, never trained, kept outside the merge; only the backbone is merged.",
        "- BWT = mean over tasks i < T of a_i(final merge) − a_i(merge right after task i).",
        "- normalised ACC = mean over tasks of a_i(final merge) / a_i(its own fine-tuned model).",
        *[f"- recipe, {k}: {v}" for k, v in results.get("recipe", {}).items()],
        *[f"- note: {n}" for n in results["notes"]],
        "",
        *regime_markdown(results.get("diagnostics", {})),
    ]
    Path(paths["markdown"]).write_text("\n".join(md) + "\n")
    plot_curves(results, Path(paths["plot"]))
    Path(paths["json"]).write_text(json.dumps(results | {"files": paths}, indent=2))
    return paths


def plot_curves(results: Mapping[str, Any], path: Path) -> None:
    """Mean accuracy (left) and normalised accuracy (right) on the tasks seen so far vs number
    of models merged, mean ± std bands over orders."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on CI or servers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    x = np.arange(1, len(results["tasks"]) + 1)
    for ax, key, ylabel in ((axes[0], "curve", "mean accuracy on tasks seen so far (%)"),
                            (axes[1], "norm_curve", "normalised accuracy (merged / individual, %)")
                            ):  # fmt: skip
        bound_styles = iter([":", "--", "-."])  # pretrained, fine-tuned: told apart by dashes
        for row in results["summary"]:
            if f"{key}_mean" not in row:
                continue
            mean = np.asarray(row[f"{key}_mean"]) * 100
            std = np.asarray(row[f"{key}_std"]) * 100
            if row["bwt_mean"] is None:  # a bound: its spread only reflects task order
                ax.plot(x, mean, linestyle=next(bound_styles, "--"), color="black", alpha=0.7,
                        label=row["method"])  # fmt: skip
                continue
            (line,) = ax.plot(x, mean, marker="o", markersize=3, label=row["method"])
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        ax.set_xlabel("number of models merged")
        ax.set_ylabel(ylabel)
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Continual merging, {results.get('model_name', 'mlp')}, "
                 f"{len(results['orders'])} orders (mean ± std)")  # fmt: skip
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# CLI


def add_continual_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``contmerge simulate continual`` (also used by ``contmerge demo``)."""
    add_output_dir(parser, "contmerge-runs/continual-MODEL; demo: contmerge-demo")
    parser.add_argument("--cache-dir", default=None,
                        help=f"checkpoint cache (default: {default_cache_dir()})")  # fmt: skip
    parser.add_argument(
        "--strategy", action="append", default=None, metavar="SPEC[@sequential][=LABEL]",
        help="repeatable; engine spec such as opcm, 'ties(scaling_factor=0.1)', magmax@sequential, "
        f"or '{NO_MERGE}@sequential' (no merge). Default: all baselines, OPCM and MagMax-Seq",
    )  # fmt: skip
    parser.add_argument(
        "--orders",
        type=positive_int,
        default=None,
        help="arrival orders (mlp: 10; quick and real models: 5)",
    )
    parser.add_argument("--order-seed", type=int, default=42,
                        help="seed of the random arrival orders (default 42)")  # fmt: skip
    parser.add_argument("--tasks", default=None, help=_tasks_help())
    parser.add_argument("--seed", type=int, default=0, help="data split and training seed")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="mlp: fine-tuning epochs per task")  # fmt: skip
    parser.add_argument("--pretrain-epochs", type=positive_int, default=None,
                        help="mlp: epochs of pretraining θ0 on the pretraining split")  # fmt: skip
    parser.add_argument("--n-train", type=positive_int, default=None,
                        help="training samples per task")  # fmt: skip
    parser.add_argument("--n-test", type=positive_int, default=None,
                        help="test samples per task")  # fmt: skip
    parser.add_argument(
        "--model",
        choices=MODELS,
        default="mlp",
        help="mlp (small MLP, minutes) or a real pretrained transformer: minilm "
        "(text), vit-s (DINOv2 images), smollm2-lora (LoRA adapters of an LLM)",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="real models: fine-tuning steps per task (default: the model's recipe)",
    )
    parser.add_argument("--quick", action="store_true", help="small, fast setting (the demo)")
    parser.add_argument("--digits-only", action="store_true",
                        help="ignore Fashion-MNIST even if installed")  # fmt: skip
    parser.add_argument("--fashion-dir", default=str(FASHION_DIR),
                        help="where Debian's dataset-fashion-mnist put its files")  # fmt: skip
    add_no_progress(parser)
    return parser


def _tasks_help() -> str:
    from .data import DIGITS_TASKS, FASHION_TASKS
    from .text_tasks import TEXT_TASKS
    from .vision_tasks import VISION_TASKS

    def names(items: Any) -> str:
        return ", ".join(getattr(t, "name", t) for t in items)

    return (
        f"comma-separated subset of the tasks. mlp: {names(FASHION_TASKS)} (digits-only: "
        f"{names(DIGITS_TASKS)}); minilm and smollm2-lora: {names(TEXT_TASKS)}; vit-s: "
        f"{names(VISION_TASKS)}"
    )


def config_from_args(args: argparse.Namespace, *, quick: bool | None = None) -> ContinualConfig:
    quick = bool(args.quick) if quick is None else quick
    strategies = (
        tuple(parse_strategy_arg(s) for s in args.strategy) if args.strategy else DEFAULT_STRATEGIES
    )
    model = getattr(args, "model", "mlp")
    default_out = "contmerge-demo" if quick else f"contmerge-runs/continual-{model}"
    return ContinualConfig(
        output_dir=args.output_dir or default_out,
        cache_dir=args.cache_dir,
        strategies=strategies,
        num_orders=args.orders,
        order_seed=args.order_seed,
        tasks=names_list(args.tasks),
        seed=args.seed,
        epochs=args.epochs,
        pretrain_epochs=args.pretrain_epochs,
        n_train=args.n_train,
        n_test=args.n_test,
        quick=quick,
        use_fashion=False if args.digits_only else None,
        fashion_dir=args.fashion_dir,
        progress=not args.no_progress,
        model=model,
        steps=getattr(args, "steps", None),
    )


def _print_summary(results: Mapping[str, Any]) -> None:
    print()
    print(markdown_table(results))
    print()
    t = results["timing_s"]
    print("\n".join(regime_markdown(results.get("diagnostics", {}))))
    print()
    print(
        f"time: {t['total']:.1f} s (training/cache {t['training_or_cache']:.1f} s, "
        f"merge+eval {t['merge_and_eval']:.1f} s, diagnostics {t.get('diagnostics', 0):.1f} s)"
    )
    for kind, path in results["files"].items():
        print(f"{kind:>8}: {path}")


def main_continual(args: argparse.Namespace) -> int:
    results = run_continual(config_from_args(args))
    _print_summary(results)
    return 0


def demo_config(output_dir: str = "contmerge-demo", **overrides: Any) -> ContinualConfig:
    """The default quick scenario: 8 tasks, 5 orders, every strategy; < 5 min from scratch."""
    return ContinualConfig(output_dir=output_dir, quick=True, **overrides)


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_continual_arguments(parser)
    return parser


#: measured full-run times on this 2-core machine (shared), shown as the demo's next step
REAL_RUN_TIMES = {
    "minilm": "31 fine-tunes × 20 steps at ≈ 2.5 s/step under load, then merge + evaluation; "
    "see docs/continual.md",
    "vit-s": "31 fine-tunes × 20 steps at ≈ 2.7 s/step under load, then merge + evaluation "
    "(measured: 50 min wall, 10 min CPU); see docs/continual.md",
    "smollm2-lora": "not measured in full yet; see docs/continual.md",
}


def main_demo(args: argparse.Namespace) -> int:
    results = run_continual(config_from_args(args, quick=True))
    _print_summary(results)
    print("\nnext: the same experiment on real pretrained transformers (checkpoints cached):")
    for model, took in REAL_RUN_TIMES.items():
        print(f"  contmerge simulate continual --model {model}   # first run: {took}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m contmerge.simulations.continual`` (the same options as the CLI command)."""
    parser = add_continual_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    return main_continual(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
