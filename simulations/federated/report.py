"""Per-round accuracy of a federated comparison as a markdown table, JSON and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .run import FederatedResults


def accuracy_rows(results: FederatedResults) -> list[dict[str, Any]]:
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


def markdown(results: FederatedResults) -> str:
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
    return "\n".join([*lines, "", *timing_lines(results)]) + "\n"


def timing_lines(results: FederatedResults) -> list[str]:
    """Where the time went: start-up apart, then per strategy its rounds and the server's share."""
    names = list(results["strategies"])
    lines = [
        f"Wall-clock seconds. Simulation start-up (Ray, before the ServerApp ran): "
        f"{results.get('startup_seconds', float('nan')):.1f} s.",
        "",
        "| strategy | round 1 | later rounds (mean) | server's work per round (mean) | total |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in names:
        s = results["strategies"][name]
        rounds = _by_round(s.get("round_seconds", {}))
        later = [t for r, t in rounds.items() if r > 1]
        server = list(_by_round(s.get("server_seconds", {})).values())
        lines.append(
            f"| {name} | {_seconds(rounds.get(1))} | {_seconds(_mean(later))} | "
            f"{_seconds(_mean(server), 3)} | {s['seconds']:.1f} |"
        )
    lines += [
        "",
        "Rounds include the clients' local training; round 1 of the strategy that ran first "
        f"({names[0]}) also starts Ray's client actors, each loading its data. The server's work "
        "is folding the replies and emitting the merge (contmerge), `aggregate_train` (FedAvg).",
    ]
    return lines


def _by_round(values: dict[Any, float]) -> dict[int, float]:
    return {int(r): float(t) for r, t in values.items()}  # JSON made the rounds strings


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _seconds(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def figure(results: FederatedResults) -> Figure:
    """The accuracy-per-round figure (a matplotlib Figure): rounds on integer ticks."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = accuracy_rows(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # there is no round 0.25
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
    return fig


def plot(results: FederatedResults, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = figure(results)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: FederatedResults, out_dir: str | Path) -> dict[str, Path]:
    """``results.json``, ``results.md`` and ``accuracy.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "accuracy.png"}
    paths["json"].write_text(json.dumps(results, indent=2, default=str))
    paths["md"].write_text(markdown(results))
    plot(results, paths["png"])
    return paths
