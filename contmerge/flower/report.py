"""Per-round accuracy of a federated comparison as a markdown table, JSON and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def accuracy_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per round (0 = θ0): mean test accuracy of each strategy's global model."""
    strategies = results["strategies"]
    rounds = sorted({int(r) for s in strategies.values() for r in s["accuracy"]})
    rows = []
    for r in rounds:
        row: dict[str, Any] = {"round": r}
        for name, s in strategies.items():
            acc = s["accuracy"].get(r, s["accuracy"].get(str(r)))
            row[name] = None if acc is None else float(acc["mean"])
        rows.append(row)
    return rows


def markdown(results: dict[str, Any]) -> str:
    names = list(results["strategies"])
    cfg = results["config"]
    scenario = cfg["scenario"]
    lines = [
        f"Federated simulation: {cfg['clients']} clients, {cfg['rounds']} rounds, partition "
        f"{scenario['partition']}, {len(results['tasks'])} tasks ({results['sources']}), "
        f"{scenario['local_epochs']} local epoch(s); mean test accuracy of the global model "
        "(round 0 = pretrained θ0).",
        "",
        "| round | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for row in accuracy_rows(results):
        cells = ["–" if row[n] is None else f"{100 * row[n]:.2f}" for n in names]
        lines.append(f"| {row['round']} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, s in results["strategies"].items():
        lines.append(f"- {name}: {s['seconds']:.1f} s")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    rows = accuracy_rows(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in results["strategies"]:
        points = [(r["round"], 100 * r[name]) for r in rows if r[name] is not None]
        ax.plot(*zip(*points), marker="o", label=name)
    cfg = results["config"]
    ax.set_xlabel("round")
    ax.set_ylabel("mean test accuracy (%)")
    ax.set_title(f"{cfg['clients']} clients, partition {cfg['scenario']['partition']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``results.json``, ``results.md`` and ``accuracy.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "accuracy.png"}
    paths["json"].write_text(json.dumps(results, indent=2, default=str))
    paths["md"].write_text(markdown(results))
    plot(results, paths["png"])
    return paths
