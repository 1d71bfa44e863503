"""Regime diagnostics: is a continual-merging scenario in the papers' regime?

Printed and saved with every run, from the independent task vectors τ_i = θ_i − θ0 and the
final merge (first order) of each strategy:

- ‖τ_i‖ / ‖θ0‖ per task and the pairwise cosines of the τ_i;
- the norm of the task vector each method emits, ‖merge − θ0‖, relative to mean ‖τ_i‖
  (OPCM emits mean ‖τ‖ by construction; averaging emits about mean ‖τ‖/√T for orthogonal τ);
- task arithmetic θ0 + λ Σ τ_i for λ = 0.1 … 1.0 (ACC over all tasks);
- the methods' directions at matched norms: θ0 + c·d/‖d‖ with d = merge − θ0 and c = 0.5 and
  1.0 × mean ‖τ_i‖, which separates a method's direction from the length it happens to emit;
- whether continual TA (λ = 0.3) beats averaging, as in the papers' CLIP results.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

StateDict = dict[str, torch.Tensor]
LAMBDAS = tuple(round(0.1 * i, 1) for i in range(1, 11))
NORM_SCALES = (0.5, 1.0)
TA_LABEL, AVERAGE_LABEL = "C. Task Arithmetic", "Average"


def _float_keys(base: Mapping[str, torch.Tensor]) -> list[str]:
    return [k for k, v in base.items() if v.is_floating_point()]


def _flat(state: Mapping[str, torch.Tensor], keys: Sequence[str], base=None) -> torch.Tensor:
    parts = [(state[k].double() - (base[k].double() if base is not None else 0)).flatten()
             for k in keys]  # fmt: skip
    return torch.cat(parts)


def _along(base: StateDict, keys: Sequence[str], direction: torch.Tensor, scale: float
           ) -> StateDict:  # fmt: skip
    out = {k: v.clone() for k, v in base.items()}
    offset = 0
    for k in keys:
        n = base[k].numel()
        out[k] = (base[k].double() + scale * direction[offset : offset + n].view_as(base[k])).to(
            base[k].dtype
        )
        offset += n
    return out


def regime_diagnostics(
    scenario: Any,
    base: StateDict,
    finetuned: Mapping[str, StateDict],
    finals: Mapping[str, StateDict],
    names: Sequence[str],
    merge_fn: Callable[..., Any] | None = None,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """All the measurements of the module docstring (accuracy via ``scenario.accuracy``)."""
    keys = _float_keys(base)
    theta0 = _flat(base, keys)
    taus = {n: _flat(finetuned[n], keys, base) for n in names}
    norms = {n: float(t.norm()) for n in names for t in [taus[n]]}
    mean_norm = float(np.mean(list(norms.values())))
    cos = [[float(taus[a] @ taus[b] / (norms[a] * norms[b] + 1e-30)) for b in names]
           for a in names]  # fmt: skip
    off = [cos[i][j] for i in range(len(names)) for j in range(len(names)) if i != j]
    emitted = {label: float(_flat(state, keys, base).norm()) / mean_norm
               for label, state in finals.items()}  # fmt: skip

    def acc(state: StateDict) -> float:
        return float(np.mean(list(scenario.accuracy(state, names).values())))

    total = sum(taus.values())
    steps = [("ta", lam) for lam in LAMBDAS]
    directions = {"sum of τ (= Average, TA)": total}
    for label, state in finals.items():
        if label not in (AVERAGE_LABEL, TA_LABEL):  # the same direction as the sum
            directions[label] = _flat(state, keys, base)
    steps += [("dir", (label, c)) for label in directions for c in NORM_SCALES]
    sweep: dict[str, float] = {}
    matched: dict[str, dict[str, float]] = {}
    for kind, arg in tqdm(steps, desc="regime diagnostics", disable=not progress):
        if kind == "ta":
            sweep[f"{arg:.1f}"] = acc(_along(base, keys, total, float(arg)))
        else:
            label, c = arg
            d = directions[label]
            norm = float(d.norm())
            value = acc(_along(base, keys, d, c * mean_norm / norm)) if norm > 0 else float("nan")
            matched.setdefault(label, {})[f"{c:g}"] = value
    out: dict[str, Any] = {
        "tau_norm": norms,
        "theta0_norm": float(theta0.norm()),
        "tau_rel_norm": {n: norms[n] / float(theta0.norm()) for n in names},
        "mean_tau_norm": mean_norm,
        "cosines": {
            "names": list(names),
            "matrix": cos,
            "offdiag_min": min(off, default=0.0),
            "offdiag_max": max(off, default=0.0),
            "offdiag_mean": float(np.mean(off)) if off else 0.0,
        },  # fmt: skip
        "emitted_norm_rel": emitted,
        "ta_lambda_sweep": sweep,
        "norm_matched": matched,
        "parameters": int(theta0.numel()),
    }
    return out


def ta_beats_average(results: Mapping[str, Any]) -> bool | None:
    rows = {r["method"]: r for r in results.get("summary", [])}
    if TA_LABEL in rows and AVERAGE_LABEL in rows:
        return bool(rows[TA_LABEL]["acc_mean"] > rows[AVERAGE_LABEL]["acc_mean"])
    return None


def lora_agreement(
    scenario: Any,
    base: StateDict,
    strategies: Sequence[Any],
    order: Sequence[str],
    merge_fn: Callable[..., Any],
) -> dict[str, dict[str, float]]:
    """Per strategy: fold the adapters (deltas) and, separately, the ``merge_and_unload``
    models of the same order; max |Δ| of the two final merges, relative to max |merge − θ0|."""
    out: dict[str, dict[str, float]] = {}
    for spec in strategies:
        if spec.strategy == "latest":
            continue
        paths = scenario.paths(spec.checkpoints, order)
        a = merge_fn(base, spec.strategy, spec.hparams)
        b = merge_fn(base, spec.strategy, spec.hparams)
        for p in paths:
            a.fold(p)
            b.fold(scenario.full_state(p))
        ma, mb = a.emit_state_dict(), b.emit_state_dict()
        diff = max(float((ma[k].double() - mb[k].double()).abs().max()) for k in ma)
        moved = max(float((ma[k].double() - base[k].double()).abs().max()) for k in ma)
        out[spec.label] = {"max_abs_diff": diff, "max_abs_update": moved,
                           "relative": diff / moved if moved else 0.0}  # fmt: skip
        for m in (a, b):
            close = getattr(m, "close", None)
            if callable(close):
                close()
    return out


def regime_markdown(diag: Mapping[str, Any]) -> list[str]:
    """The diagnostics as markdown lines (empty if there are none)."""
    if not diag:
        return []
    names = list(diag["tau_rel_norm"])
    lines = ["## Regime diagnostics", "",
             f"Merged parameters: {diag['parameters']:,}; mean ‖τ‖ = {diag['mean_tau_norm']:.4g}.",
             "", "| Task | ‖τ‖/‖θ0‖ |", "|---|---|"]  # fmt: skip
    lines += [f"| {n} | {diag['tau_rel_norm'][n]:.4f} |" for n in names]
    c = diag["cosines"]
    lines += ["", f"Pairwise cosines of task vectors: min {c['offdiag_min']:+.3f}, mean "
              f"{c['offdiag_mean']:+.3f}, max {c['offdiag_max']:+.3f}.", "",
              "| Method | emitted ‖merge − θ0‖ / mean ‖τ‖ |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v:.2f} |" for k, v in diag["emitted_norm_rel"].items()]
    sweep = diag["ta_lambda_sweep"]
    lines += ["", "Task arithmetic θ0 + λΣτ, ACC (%):", "",
              "| λ | " + " | ".join(sweep) + " |", "|---|" + "---|" * len(sweep),
              "| ACC | " + " | ".join(f"{100 * v:.1f}" for v in sweep.values()) + " |"]  # fmt: skip
    scales = list(next(iter(diag["norm_matched"].values()), {}))
    lines += ["", "Directions at matched norm, θ0 + c·mean‖τ‖·d/‖d‖, ACC (%):", "",
              "| Direction | " + " | ".join(f"c = {s}" for s in scales) + " |",
              "|---|" + "---|" * len(scales)]  # fmt: skip
    lines += [f"| {k} | " + " | ".join(f"{100 * v[s]:.1f}" for s in scales) + " |"
              for k, v in diag["norm_matched"].items()]  # fmt: skip
    if "ta_beats_average" in diag:
        lines += ["", f"C. TA (λ = 0.3) beats Average (the papers' regime): "
                  f"**{'yes' if diag['ta_beats_average'] else 'no'}**."]  # fmt: skip
    if "lora_vs_merge_and_unload" in diag:
        lines += ["", "| LoRA: adapters vs merge_and_unload models | max abs diff | relative |",
                  "|---|---|---|"]  # fmt: skip
        lines += [f"| {k} | {v['max_abs_diff']:.2e} | {v['relative']:.2e} |"
                  for k, v in diag["lora_vs_merge_and_unload"].items()]  # fmt: skip
    return lines
