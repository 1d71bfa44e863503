"""Why the default 8-task continual-merging results differ from the papers' ordering: measurements.

Reads the cached checkpoints of the default (full-mode) continual scenario — θ0, the frozen probe
heads and the 8 independently fine-tuned backbones — and measures, without retraining or tuning
anything:

- ``table``    final per-task accuracy of every strategy (engine, defaults), mean ± std over orders;
- ``group``    the same when only the 5 fashion tasks or only the 3 digits tasks are merged;
- ``norms``    task-vector norms per task and per layer;
- ``cosine``   pairwise cosine similarity of task vectors (whole model and first-layer weight);
- ``pixels``   constant ("always-background") input pixels per task, the share of each task
               vector's first-layer change on them, and the first-layer pre-activation shift that
               the OTHER tasks' vectors cause on each task's inputs (split: constant pixels /
               varying pixels / bias);
- ``pairs``    pairwise interference: accuracy of task i under θ0 + λ(τ_i + τ_j), λ = 0.3;
- ``ablation`` diagnostic edits of the OTHER tasks' vectors before merging (zero their first-layer
               columns on the target task's constant pixels; the complement; their whole first
               block; everything but their first block), target-task accuracy per strategy;
- ``opcm``     OPCM's global rescale vs a per-layer rescale vs no projection (same rescale);
- ``heads``    frozen probe heads vs probes re-fit on the merged features, and feature drift.

The ablations are diagnostics, not proposed methods. Nothing here edits the scenario.
Run: ``python benchmarks/continual_analysis.py`` (about 5-8 min on 1 thread; ``--sections`` to
pick parts). Results are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contmerge import Merger
from contmerge.simulations.continual import ContinualConfig, default_cache_dir, make_orders
from contmerge.simulations.data import load_suite
from contmerge.simulations.evaluate import Evaluator
from contmerge.simulations.models import ModelConfig, StateDict, backbone_from_state
from contmerge.simulations.train import (
    TrainConfig,
    cache_key,
    fit_probe_head,
    load_safetensors,
)
from contmerge.strategies.opcm import project_out

STRATEGIES: tuple[tuple[str, str], ...] = (
    ("Average", "average"),
    ("C. Task Arithmetic", "task_arithmetic"),
    ("C. TIES", "ties"),
    ("MagMax-Ind", "magmax"),
    ("OPCM", "opcm"),
)
ORDER_FREE = {"average", "task_arithmetic", "magmax"}  # final merge does not depend on order
SECTIONS = ("table", "group", "norms", "cosine", "pixels", "pairs", "ablation", "opcm", "heads")
FC1_W, FC1_B = "blocks.0.fc.weight", "blocks.0.fc.bias"
TA_LAMBDA = 0.3


# --------------------------------------------------------------------------------------------
# Loading


def resolve_checkpoints(arg: str | None, config: ContinualConfig, sources: str) -> Path:
    """The checkpoint directory of the full-mode scenario.

    The cache key hashes the data/model/train *source code*; if that changed since the cached
    checkpoints were trained, fall back to a cached directory whose recorded data and training
    settings equal the full-mode ones (and say so).
    """
    if arg:
        return Path(arg)
    root = default_cache_dir()
    data_cfg, train_cfg = config.data_config(), config.train_config()
    key = cache_key(data_cfg, ModelConfig(), train_cfg, sources)
    if (root / key / "independent").is_dir():
        return root / key
    want_data = {k: v for k, v in asdict(data_cfg).items() if k != "fashion_dir"}
    want_train = {k: v for k, v in train_cfg.to_dict().items() if k != "threads"}
    hits = []
    for d in sorted(root.glob("*/config.json")):
        c = json.loads(d.read_text())
        data = {k: v for k, v in c.get("data", {}).items() if k != "fashion_dir"}
        train = {k: v for k, v in c.get("train", {}).items() if k != "threads"}
        if data == want_data and train == want_train and (d.parent / "independent").is_dir():
            hits.append(d.parent)
    if not hits:
        raise SystemExit(
            f"no cached full-mode checkpoints under {root}; run "
            "`python -m contmerge.simulations.continual` first"
        )
    print(
        f"note: cache key for the current code is {key} (absent); using {hits[-1]}, whose "
        "recorded data/train settings equal the full-mode ones (code fingerprint differs)"
    )
    return hits[-1]


def task_vector(state: StateDict, base: StateDict) -> StateDict:
    return {k: state[k] - base[k] for k in base}


def add(base: StateDict, *vecs: StateDict, scale: float = 1.0) -> StateDict:
    out = {k: v.clone() for k, v in base.items()}
    for vec in vecs:
        for k in out:
            out[k] += scale * vec[k]
    return out


def flat(vec: StateDict, keys: Sequence[str] | None = None) -> torch.Tensor:
    return torch.cat([vec[k].flatten().double() for k in (keys or sorted(vec))])


def layer_groups(keys: Sequence[str]) -> dict[str, list[str]]:
    """fc1.W, fc1.b, ln1, fc2.W, … (block by block)."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        _, b, kind, p = k.split(".")
        i = int(b) + 1
        name = f"ln{i}" if kind == "norm" else f"fc{i}.W" if p == "weight" else f"fc{i}.b"
        groups.setdefault(name, []).append(k)
    rank = {"W": 0, "b": 1}
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][2], rank.get(kv[0][-1], 2))))


def merge_engine(strategy: str, base: StateDict, states: Sequence[StateDict]) -> StateDict:
    merger = Merger(base=base, strategy=strategy, state_dir=None)
    for s in states:
        merger.fold(s)
    return merger.emit_state_dict()


class Ctx:
    """Everything the sections share."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config = ContinualConfig(num_orders=args.orders)
        self.suite = load_suite(self.config.data_config())
        self.names = self.suite.names
        self.fashion = [n for n in self.names if n.startswith("fashion")]
        self.digits = [n for n in self.names if n.startswith("digits")]
        self.root = resolve_checkpoints(args.checkpoints, self.config, self.suite.sources)
        self.base = load_safetensors(self.root / "pretrained.safetensors")
        self.heads = {
            n: load_safetensors(self.root / "heads" / f"{n}.safetensors") for n in self.names
        }
        self.ft = {
            n: load_safetensors(self.root / "independent" / f"{n}.safetensors") for n in self.names
        }
        self.tau = {n: task_vector(self.ft[n], self.base) for n in self.names}
        self.evaluator = Evaluator(self.suite.tasks, self.heads, ModelConfig())
        self.tasks = {t.name: t for t in self.suite.tasks}
        self.orders = make_orders(self.names, args.orders, self.config.order_seed)
        self.keys = list(self.base)
        self.groups = layer_groups(self.keys)
        # constant pixels per task: identical value in every training image (the test images are
        # checked in the pixels section)
        self.const = {}
        for n in self.names:
            x = self.tasks[n].x_train
            self.const[n] = x.max(0).values == x.min(0).values

    def acc(self, state: StateDict, names: Sequence[str]) -> dict[str, float]:
        return self.evaluator.accuracy(state, names)


def pm(values: Sequence[float]) -> str:
    a = 100 * np.asarray(values, dtype=float)
    return f"{a.mean():.1f}" if a.std() < 0.05 else f"{a.mean():.1f}±{a.std():.1f}"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


def short(name: str) -> str:
    return name.replace("fashion_", "f_").replace("digits", "d").replace("_permuted", "_perm")


# --------------------------------------------------------------------------------------------
# Sections


def merged_runs(
    ctx: Ctx,
    names: Sequence[str],
    orders: Sequence[Sequence[str]],
    taus: Mapping[str, StateDict] | None = None,
    strategies: Sequence[tuple[str, str]] = STRATEGIES,
    eval_names: Sequence[str] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """label -> task -> final accuracies over orders (one order for order-free strategies)."""
    taus = taus or ctx.tau
    out: dict[str, dict[str, list[float]]] = {}
    for label, strategy in strategies:
        per: dict[str, list[float]] = {n: [] for n in (eval_names or names)}
        for k, order in enumerate(orders):
            if strategy in ORDER_FREE and k > 0:
                break
            sub = [n for n in order if n in names]
            merged = merge_engine(strategy, ctx.base, [add(ctx.base, taus[n]) for n in sub])
            for n, a in ctx.acc(merged, list(per)).items():
                per[n].append(a)
        out[label] = per
    return out


def section_table(ctx: Ctx) -> dict[str, Any]:
    pre = ctx.acc(ctx.base, ctx.names)
    ind = {n: ctx.acc(ctx.ft[n], [n])[n] for n in ctx.names}
    runs = merged_runs(ctx, ctx.names, ctx.orders)
    rows = [
        [
            "Pretrained",
            pm([np.mean(list(pre.values()))]),
            pm([np.mean([pre[n] for n in ctx.fashion])]),
            pm([np.mean([pre[n] for n in ctx.digits])]),
            *(pm([pre[n]]) for n in ctx.names),
        ],
        [
            "Fine-tuned",
            pm([np.mean(list(ind.values()))]),
            pm([np.mean([ind[n] for n in ctx.fashion])]),
            pm([np.mean([ind[n] for n in ctx.digits])]),
            *(pm([ind[n]]) for n in ctx.names),
        ],
    ]
    out: dict[str, Any] = {"pretrained": pre, "individual": ind, "runs": runs}
    for label, per in runs.items():
        m = len(next(iter(per.values())))
        acc = [np.mean([per[n][k] for n in ctx.names]) for k in range(m)]
        fa = [np.mean([per[n][k] for n in ctx.fashion]) for k in range(m)]
        da = [np.mean([per[n][k] for n in ctx.digits]) for k in range(m)]
        rows.append([label, pm(acc), pm(fa), pm(da), *(pm(per[n]) for n in ctx.names)])
    print_table(
        "Final accuracy (%) of the 8-task merge, mean±std over orders (engine defaults)",
        ["method", "ACC", "fashion5", "digits3", *map(short, ctx.names)],
        rows,
    )
    return out


def section_group(ctx: Ctx, full: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rows = []
    for gname, group in (("fashion only", ctx.fashion), ("digits only", ctx.digits)):
        orders = make_orders(group, ctx.args.orders, ctx.config.order_seed)
        runs = merged_runs(ctx, group, orders)
        out[gname] = runs
        for label, per in runs.items():
            m = len(next(iter(per.values())))
            g = [np.mean([per[n][k] for n in group]) for k in range(m)]
            in8 = "—"
            if full is not None:
                p8 = full["runs"][label]
                m8 = len(next(iter(p8.values())))
                in8 = pm([np.mean([p8[n][k] for n in group]) for k in range(m8)])
            rows.append([gname, label, pm(g), in8, *(pm(per[n]) for n in group)])
    print_table(
        "Merging one group only: group mean accuracy (%) vs the same tasks in the 8-task merge",
        ["group", "method", "group-only merge", "same tasks, 8-task merge", "per task…"],
        rows,
    )
    return out


def section_norms(ctx: Ctx) -> dict[str, Any]:
    out = {}
    rows = []
    base_norms = {g: float(flat(ctx.base, ks).norm()) for g, ks in ctx.groups.items()}
    for n in ctx.names:
        d = {g: float(flat(ctx.tau[n], ks).norm()) for g, ks in ctx.groups.items()}
        d["total"] = float(flat(ctx.tau[n]).norm())
        out[n] = d
        rows.append([short(n), f"{d['total']:.2f}", *(f"{d[g]:.2f}" for g in ctx.groups)])
    rows.append(
        [
            "‖θ0‖",
            f"{float(flat(ctx.base).norm()):.1f}",
            *(f"{base_norms[g]:.1f}" for g in ctx.groups),
        ]
    )
    print_table("Task-vector L2 norms per layer group", ["task", "total", *ctx.groups], rows)
    out["base"] = base_norms
    return out


def cosine_matrix(vecs: Mapping[str, torch.Tensor], names: Sequence[str]) -> np.ndarray:
    m = np.zeros((len(names), len(names)))
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            m[i, j] = float(torch.nn.functional.cosine_similarity(vecs[a], vecs[b], dim=0))
    return m


def section_cosine(ctx: Ctx) -> dict[str, Any]:
    out = {}
    for label, keys in (
        ("whole model", None),
        ("fc1.W", [FC1_W]),
        ("blocks 2-3", [k for k in ctx.keys if not k.startswith("blocks.0")]),
    ):
        vecs = {n: flat(ctx.tau[n], keys) for n in ctx.names}
        m = cosine_matrix(vecs, ctx.names)
        out[label] = m.tolist()
        rows = [
            [short(a), *(f"{m[i, j]:+.2f}" for j in range(len(ctx.names)))]
            for i, a in enumerate(ctx.names)
        ]
        off = ~np.eye(len(ctx.names), dtype=bool)
        fi = [ctx.names.index(n) for n in ctx.fashion]
        di = [ctx.names.index(n) for n in ctx.digits]
        ff = m[np.ix_(fi, fi)][off[np.ix_(fi, fi)]].mean()
        dd = m[np.ix_(di, di)][off[np.ix_(di, di)]].mean()
        fd = m[np.ix_(fi, di)].mean()
        print_table(
            f"Cosine similarity of task vectors — {label} "
            f"(mean fashion-fashion {ff:+.2f}, digits-digits {dd:+.2f}, "
            f"fashion-digits {fd:+.2f})",
            ["", *map(short, ctx.names)],
            rows,
        )
        out[label + " means"] = {"ff": ff, "dd": dd, "fd": fd}
    return out


def centred(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0 - 1.0  # what Backbone.forward does first


def shift_parts(
    w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, const: torch.Tensor
) -> dict[str, float]:
    """RMS over (samples, units) of the pre-activation change x·wᵀ + b split by input pixels."""
    c = x[:, const] @ w[:, const].T
    v = x[:, ~const] @ w[:, ~const].T
    return {
        "const_px": float(c.pow(2).mean().sqrt()),
        "varying_px": float(v.pow(2).mean().sqrt()),
        "bias": float(b.pow(2).mean().sqrt()),
        "total": float((c + v + b).pow(2).mean().sqrt()),
    }


def section_pixels(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {"n_const": {}, "energy_on_const": {}, "shift": {}}
    rows = []
    for n in ctx.names:
        xt = ctx.tasks[n].x_test
        test_viol = int(
            ((xt[:, ctx.const[n]] - ctx.tasks[n].x_train[0, ctx.const[n]]).abs() > 0).any(0).sum()
        )
        frac_zero = float((ctx.tasks[n].x_train == 0).float().mean())
        out["n_const"][n] = int(ctx.const[n].sum())
        rows.append([short(n), int(ctx.const[n].sum()), test_viol, f"{frac_zero:.2f}"])
    print_table(
        "Constant input pixels per task (same value in all training images)",
        ["task", "#const of 784", "#of those varying in test", "share of 0-pixels"],
        rows,
    )

    # share of each task vector's fc1.W energy on each task's constant-pixel columns
    rows = []
    for j in ctx.names:
        w = ctx.tau[j][FC1_W]
        tot = float(w.pow(2).sum())
        e = {i: float(w[:, ctx.const[i]].pow(2).sum()) / tot for i in ctx.names}
        out["energy_on_const"][j] = e
        rows.append([short(j), *(f"{100 * e[i]:.0f}" for i in ctx.names)])
    rows.append(
        ["(column share)", *(f"{100 * float(ctx.const[i].float().mean()):.0f}" for i in ctx.names)]
    )
    print_table(
        "Share (%) of τ_row's fc1.W energy on the columns of col-task's constant pixels",
        ["τ \\ const of", *map(short, ctx.names)],
        rows,
    )

    # pre-activation shift on task i's inputs from the OTHER tasks' vectors (TA λ and Avg 1/8),
    # compared with the own vector's shift and with the spread of θ0's pre-activations
    rows = []
    w0, b0 = ctx.base[FC1_W], ctx.base[FC1_B]
    for i in ctx.names:
        x = centred(ctx.tasks[i].x_test)
        z0 = x @ w0.T + b0
        spread = float(z0.std(0).pow(2).mean().sqrt())  # signal: per-unit std over inputs
        others = [j for j in ctx.names if j != i]
        dw = sum(ctx.tau[j][FC1_W] for j in others)
        db = sum(ctx.tau[j][FC1_B] for j in others)
        d: dict[str, Any] = {"spread_theta0": spread}
        for lab, lam in (("TA", TA_LAMBDA), ("Avg", 1 / len(ctx.names))):
            d[lab + " others"] = shift_parts(lam * dw, lam * db, x, ctx.const[i])
            d[lab + " own"] = shift_parts(
                lam * ctx.tau[i][FC1_W], lam * ctx.tau[i][FC1_B], x, ctx.const[i]
            )
        out["shift"][i] = d
        # how bias-like the others' change on i's constant columns is: rank-1 energy share
        if int(ctx.const[i].sum()) >= 10:
            sv = torch.linalg.svdvals(dw[:, ctx.const[i]])
            d["others_const_rank1_share"] = float(sv[0] ** 2 / sv.pow(2).sum())
        o, s = d["TA others"], d["TA own"]
        rows.append(
            [
                short(i),
                f"{spread:.2f}",
                f"{s['total']:.2f}",
                f"{o['total']:.2f}",
                f"{o['const_px']:.2f}",
                f"{o['varying_px']:.2f}",
                f"{o['bias']:.2f}",
                f"{o['const_px'] / spread:.2f}",
                f"{d.get('others_const_rank1_share', float('nan')):.2f}",
            ]
        )
    print_table(
        "First-layer pre-activation shift on each task's test inputs, TA λ=0.3 (RMS over inputs "
        "and units); 'others' = Σ_{j≠i} λτ_j, split by task i's constant pixels",
        [
            "task i",
            "θ0 spread",
            "own total",
            "others total",
            "others: const px",
            "others: varying px",
            "others: bias",
            "const px / spread",
            "rank-1 share (const cols)",
        ],
        rows,
    )
    # why fashion vectors move the digits-border columns: those pixels are mostly background
    # (0, i.e. -1 after centring) in fashion images too, so their weights act like a bias there
    border = ctx.const[ctx.digits[0]] if ctx.digits else None
    if border is not None:
        out["fashion_background_on_digits_const"] = {}
        cells = []
        for n in ctx.fashion:
            x = ctx.tasks[n].x_train[:, border]
            bg = float(((x == 0) | (x == 1)).float().mean())
            out["fashion_background_on_digits_const"][n] = bg
            cells.append(f"{short(n)} {100 * bg:.0f}%")
        print(
            f"\nshare of {short(ctx.digits[0])}'s constant pixels that are 0 or 1 (background) "
            "in fashion training images: " + ", ".join(cells)
        )
    return out


def section_pairs(ctx: Ctx) -> dict[str, Any]:
    """acc_i(θ0 + λτ_i + λτ_j) − acc_i(θ0 + λτ_i), with and without τ_j's columns on C_i."""
    lam = TA_LAMBDA
    out: dict[str, Any] = {"alone": {}, "drop": {}, "drop_const_zeroed": {}}
    rows, rows_z = [], []
    for i in ctx.names:
        alone = ctx.acc(add(ctx.base, ctx.tau[i], scale=lam), [i])[i]
        out["alone"][i] = alone
        r, rz = [short(i), f"{100 * alone:.1f}"], [short(i), f"{100 * alone:.1f}"]
        for j in ctx.names:
            if j == i:
                r.append("·")
                rz.append("·")
                continue
            a = ctx.acc(add(ctx.base, ctx.tau[i], ctx.tau[j], scale=lam), [i])[i]
            tj = {k: v.clone() for k, v in ctx.tau[j].items()}
            tj[FC1_W][:, ctx.const[i]] = 0
            az = ctx.acc(add(ctx.base, ctx.tau[i], tj, scale=lam), [i])[i]
            out["drop"].setdefault(i, {})[j] = a - alone
            out["drop_const_zeroed"].setdefault(i, {})[j] = az - alone
            r.append(f"{100 * (a - alone):+.1f}")
            rz.append(f"{100 * (az - alone):+.1f}")
        rows.append(r)
        rows_z.append(rz)
    hdr = ["task i", "acc θ0+λτ_i", *(f"+{short(j)}" for j in ctx.names)]
    print_table("Pairwise interference: Δacc_i (points) from adding λτ_j (λ=0.3)", hdr, rows)
    print_table("Same, with τ_j's fc1.W columns on task i's constant pixels zeroed", hdr, rows_z)
    return out


def _edit(tau: StateDict, how: str, const: torch.Tensor) -> StateDict:
    t = {k: v.clone() for k, v in tau.items()}
    if how == "zero const-px cols":
        t[FC1_W][:, const] = 0
    elif how == "zero varying-px cols":
        t[FC1_W][:, ~const] = 0
    elif how == "zero block 1":
        for k in t:
            if k.startswith("blocks.0."):
                t[k].zero_()
    elif how == "only block 1":
        for k in t:
            if not k.startswith("blocks.0."):
                t[k].zero_()
    elif how != "none":
        raise ValueError(how)
    return t


ABLATIONS = ("none", "zero const-px cols", "zero varying-px cols", "zero block 1", "only block 1")


def section_ablation(ctx: Ctx) -> dict[str, Any]:
    orders = ctx.orders[: ctx.args.ablation_orders]
    targets = ctx.args.targets.split(",") if ctx.args.targets else ctx.names
    out: dict[str, Any] = {}
    for label, strategy in STRATEGIES:
        rows = []
        for i in targets:
            res = {}
            for how in ABLATIONS:
                taus = {
                    j: (ctx.tau[j] if j == i else _edit(ctx.tau[j], how, ctx.const[i]))
                    for j in ctx.names
                }
                runs = merged_runs(ctx, ctx.names, orders, taus, [(label, strategy)], [i])
                res[how] = runs[label][i]
            out.setdefault(label, {})[i] = res
            rows.append([short(i), *(pm(res[h]) for h in ABLATIONS)])
        print_table(
            f"Diagnostic edits of the OTHER tasks' vectors — {label}: target-task "
            f"accuracy (%), {len(orders)} order(s)",
            ["target", *ABLATIONS],
            rows,
        )
    if set(targets) == set(ctx.names):
        rows = []
        for label, _ in STRATEGIES:
            res = out[label]
            cells = []
            for how in ABLATIONS:
                mean = {n: float(np.mean(res[n][how])) for n in ctx.names}
                cells.append(
                    f"{100 * np.mean(list(mean.values())):.1f} "
                    f"({100 * np.mean([mean[n] for n in ctx.fashion]):.1f} / "
                    f"{100 * np.mean([mean[n] for n in ctx.digits]):.1f})"
                )
            rows.append([label, *cells])
        print_table(
            "Diagnostic ACC (%) over the 8 targets, each target with its own edited merge — "
            "ACC (fashion5 / digits3)",
            ["method", *ABLATIONS],
            rows,
        )
    return out


def opcm_functional(
    base: StateDict,
    taus: Sequence[StateDict],
    alpha: float = 0.5,
    rescale: str = "global",
    project: bool = True,
) -> tuple[StateDict, dict]:
    """OPCM's fold on the un-normalised sum S (as strategies/opcm.py), with a choice of rescale:
    'global' (the paper/code), 'layer' (per tensor: mean arrival norm of that tensor / ‖S_p‖)."""
    s = {k: torch.zeros_like(v) for k, v in base.items()}
    norms: list[float] = []
    tensor_norms: dict[str, list[float]] = {k: [] for k in base}
    for t, tau in enumerate(taus):
        norms.append(float(flat(tau).norm()))
        for k in base:
            tensor_norms[k].append(float(tau[k].double().norm()))
            d = tau[k]
            if project and t > 0 and d.ndim == 2 and s[k].any():
                d = project_out(s[k], d, alpha)
            s[k] = s[k] + d
    info: dict[str, Any] = {}
    if rescale == "global":
        scale = float(np.mean(norms)) / float(flat(s).norm())
        info["scale"] = scale
        scales = dict.fromkeys(base, scale)
    elif rescale == "layer":
        scales = {
            k: float(np.mean(tensor_norms[k])) / max(float(s[k].double().norm()), 1e-30)
            for k in base
        }
    else:
        raise ValueError(rescale)
    # per-tensor ratio ‖emitted Δ_p‖ / mean_t ‖τ_t,p‖ (1.0 = each layer keeps an average size)
    info["layer_ratio"] = {
        k: scales[k] * float(s[k].double().norm()) / np.mean(tensor_norms[k]) for k in base
    }
    return {k: base[k] + scales[k] * s[k] for k in base}, info


def section_opcm(ctx: Ctx) -> dict[str, Any]:
    variants = (
        ("OPCM (global rescale)", "global", True),
        ("OPCM, per-tensor rescale", "layer", True),
        ("sum, no projection, global rescale", "global", False),
    )
    out: dict[str, Any] = {}
    # check: the functional global OPCM equals the engine's on order 0
    o0 = ctx.orders[0]
    eng = merge_engine("opcm", ctx.base, [ctx.ft[n] for n in o0])
    fun, _ = opcm_functional(ctx.base, [ctx.tau[n] for n in o0])
    out["max_abs_diff_vs_engine"] = max(float((eng[k] - fun[k]).abs().max()) for k in eng)
    print(f"\nfunctional OPCM vs engine, order 0: max |Δ| = {out['max_abs_diff_vs_engine']:.2e}")
    rows = []
    for label, rescale, project in variants:
        per: dict[str, list[float]] = {n: [] for n in ctx.names}
        scales, ratios = [], []
        for order in ctx.orders:
            merged, info = opcm_functional(
                ctx.base, [ctx.tau[n] for n in order], rescale=rescale, project=project
            )
            scales.append(info.get("scale", float("nan")))
            ratios.append(info["layer_ratio"])
            for n, a in ctx.acc(merged, ctx.names).items():
                per[n].append(a)
        m = len(ctx.orders)
        acc = [np.mean([per[n][k] for n in ctx.names]) for k in range(m)]
        fa = [np.mean([per[n][k] for n in ctx.fashion]) for k in range(m)]
        da = [np.mean([per[n][k] for n in ctx.digits]) for k in range(m)]
        r1 = np.mean([r[FC1_W] for r in ratios])
        r2 = np.mean([r["blocks.1.fc.weight"] for r in ratios])
        r3 = np.mean([r["blocks.2.fc.weight"] for r in ratios])
        out[label] = {
            "per_task": per,
            "scale": scales,
            "layer_ratio_mean": {k: float(np.mean([r[k] for r in ratios])) for k in ctx.keys},
        }
        rows.append(
            [
                label,
                pm(acc),
                pm(fa),
                pm(da),
                f"{np.mean(scales):.3f}" if rescale == "global" else "per tensor",
                f"{r1:.2f}",
                f"{r2:.2f}",
                f"{r3:.2f}",
            ]
        )
    print_table(
        "OPCM rescale variants (10 orders): accuracy (%), global scale factor, and per-layer "
        "‖emitted Δ‖ / mean‖τ‖",
        ["variant", "ACC", "fashion5", "digits3", "scale", "fc1.W", "fc2.W", "fc3.W"],
        rows,
    )
    # own-vector scale reference: acc of θ0 + c·τ_i
    rows = []
    cs = (1 / len(ctx.names), TA_LAMBDA, 0.5, 1.0)
    out["own_scaled"] = {}
    for n in ctx.names:
        accs = [ctx.acc(add(ctx.base, ctx.tau[n], scale=c), [n])[n] for c in cs]
        out["own_scaled"][n] = dict(zip(map(str, cs), accs))
        rows.append([short(n), *(f"{100 * a:.1f}" for a in accs)])
    print_table(
        "Own vector only, θ0 + c·τ_i: accuracy (%) — how much scaling alone costs",
        ["task", *(f"c={c:.3g}" for c in cs)],
        rows,
    )
    return out


@torch.no_grad()
def _feats(state: StateDict, x: torch.Tensor) -> torch.Tensor:
    return backbone_from_state(state, ModelConfig())(x)


def section_heads(ctx: Ctx) -> dict[str, Any]:
    """Frozen probe head vs a probe re-fit on the merged features (order 0 for merges)."""
    order = ctx.orders[0]
    models: dict[str, StateDict | None] = {"Pretrained": ctx.base, "Fine-tuned": None}
    for label, strategy in STRATEGIES:
        models[label] = merge_engine(strategy, ctx.base, [ctx.ft[n] for n in order])
    tcfg = replace(TrainConfig(), seed=ctx.config.seed)
    out: dict[str, Any] = {}
    rows = []
    for label, state in models.items():
        res = {}
        for n in ctx.names:
            s = ctx.ft[n] if state is None else state
            task = ctx.tasks[n]
            frozen = ctx.acc(s, [n])[n]
            head = fit_probe_head(s, task, ModelConfig(), tcfg)
            lin = torch.nn.Linear(head["weight"].shape[1], head["weight"].shape[0])
            lin.load_state_dict(head)
            with torch.no_grad():
                f = _feats(s, task.x_test)
                refit = float((lin(f).argmax(1) == task.y_test).float().mean())
                f_ft = _feats(ctx.ft[n], task.x_test)
                drift = float((f - f_ft).norm() / f_ft.norm())
            res[n] = {"frozen": frozen, "refit": refit, "drift_vs_ft": drift}
        out[label] = res
        fz = [res[n]["frozen"] for n in ctx.fashion]
        dz = [res[n]["frozen"] for n in ctx.digits]
        fr = [res[n]["refit"] for n in ctx.fashion]
        dr = [res[n]["refit"] for n in ctx.digits]
        rows.append(
            [
                label,
                pm([np.mean(fz)]),
                pm([np.mean(fr)]),
                pm([np.mean(dz)]),
                pm([np.mean(dr)]),
                f"{np.mean([res[n]['drift_vs_ft'] for n in ctx.fashion]):.2f}",
                f"{np.mean([res[n]['drift_vs_ft'] for n in ctx.digits]):.2f}",
            ]
        )
    print_table(
        "Frozen probe heads vs probes re-fit on each model's features (order 0); drift = "
        "‖f_model − f_finetuned‖/‖f_finetuned‖ on the task's test inputs",
        [
            "model",
            "fashion frozen",
            "fashion re-fit",
            "digits frozen",
            "digits re-fit",
            "fashion drift",
            "digits drift",
        ],
        rows,
    )
    return out


# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Measure why the default 8-task continual-merging results differ from the "
        "papers' ordering (reads cached checkpoints; trains nothing).",
    )
    parser.add_argument(
        "--checkpoints",
        default=None,
        help="checkpoint directory (default: the full-mode cache entry)",
    )
    parser.add_argument("--orders", type=int, default=10, help="arrival orders (default 10)")
    parser.add_argument(
        "--ablation-orders",
        type=int,
        default=3,
        help="orders for the order-dependent strategies in 'ablation' (3)",
    )
    parser.add_argument(
        "--targets",
        default=None,
        help="comma-separated target tasks for 'ablation' (default: all 8)",
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of: {', '.join(SECTIONS)}",
    )
    parser.add_argument("--output", default="contmerge-runs/continual-analysis/analysis.json")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ctx = Ctx(args)
    print(f"checkpoints: {ctx.root}")
    results: dict[str, Any] = {
        "checkpoints": str(ctx.root),
        "tasks": ctx.names,
        "orders": ctx.orders,
    }
    funcs: dict[str, Callable[[], Any]] = {
        "table": lambda: section_table(ctx),
        "group": lambda: section_group(ctx, results.get("table")),
        "norms": lambda: section_norms(ctx),
        "cosine": lambda: section_cosine(ctx),
        "pixels": lambda: section_pixels(ctx),
        "pairs": lambda: section_pairs(ctx),
        "ablation": lambda: section_ablation(ctx),
        "opcm": lambda: section_opcm(ctx),
        "heads": lambda: section_heads(ctx),
    }
    for s in SECTIONS:
        if s in sections:
            t = time.perf_counter()
            results[s] = funcs[s]()
            print(f"\n[{s}: {time.perf_counter() - t:.1f} s]")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=float))
    print(f"\nwrote {out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
