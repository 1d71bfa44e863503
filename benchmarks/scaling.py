"""Fold time and peak RSS against model size: what a fold of your model will cost.

For each model size (synthetic LLaMA-architecture bf16 checkpoints, written tensor by tensor:
``_llama.py``) and each rule, a fresh ``contmerge merge`` process creates a disk state from the
first arrival (timed too, as "first fold"), then a second process folds the second arrival into
it (the timed fold: for OPCM the first projected one, its SVDs). Each process is timed from start
to exit, its peak RSS from ``wait4`` (Python, torch and the imports included). Prints one table
row per (size, rule): wall seconds of both processes, peak RSS of the second, and that RSS over
the model's size (below 1 means the model never had to fit in memory: the out-of-core promise);
then writes the same figures as a PNG plot (``--plot``, needs matplotlib).

    python benchmarks/scaling.py --quick                 # 2 small shapes, < 2 min
    nice -n 10 python benchmarks/scaling.py --sizes 250M,1B --plot benchmarks/results/scaling.png
    # rows kept as they come (--results), a later run adds its sizes to the same plot (--merge)
    nice -n 10 python benchmarks/scaling.py --sizes 3B --results 3b.jsonl --merge earlier.jsonl \
        --workdir /work/cm-scaling --plot benchmarks/results/scaling.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from _common import human
from _llama import LlamaShape, write_llamas
from _process import timed

#: LLaMA-architecture shapes by nominal size (hidden, layers, intermediate, vocab, heads)
SHAPES = {
    "250M": LlamaShape(hidden=1024, layers=14, intermediate=2816, vocab=32000, heads=16),
    "1B": LlamaShape(hidden=2048, layers=16, intermediate=5632, vocab=32000, heads=16),
    "3B": LlamaShape(hidden=3200, layers=26, intermediate=8640, vocab=32000, heads=32),
}
QUICK_SHAPES = {
    "5M": LlamaShape(hidden=256, layers=4, intermediate=704, vocab=4000, heads=4),
    "20M": LlamaShape(hidden=512, layers=4, intermediate=1408, vocab=8000, heads=8),
}
RULES = ("average", "magmax", "ties", "opcm")
ENV = {"HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Row:
    size: str
    parameters: int
    nbytes: int
    rule: str
    first_wall: float
    fold_wall: float
    fold_rss: int


def merge_command(
    base: Path, state: Path, rule: str, model: Path, workers: int | None
) -> list[str]:
    command = [sys.executable, "-m", "contmerge", "merge", "--quiet", "--base", str(base)]
    command += ["--state", str(state), "--strategy", rule, str(model)]
    return command + (["--workers", str(workers)] if workers else [])


def load_rows(path: Path) -> list[Row]:
    """Rows saved by an earlier ``--results`` run, one JSON object a line."""
    return [Row(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def save_row(row: Row, path: Path | None) -> None:
    # appended as soon as measured: a run stopped at its deadline keeps the rows it finished
    if path is not None:
        with open(path, "a") as handle:
            handle.write(json.dumps(dataclasses.asdict(row)) + "\n")


def measure(
    size: str, shape: LlamaShape, rules: list[str], work: Path, args: argparse.Namespace
) -> list[Row]:
    models = work / size
    paths = [models / ("base" if i == 0 else f"a{i}") for i in range(3)]
    missing = {i: p for i, p in enumerate(paths) if not (p / "config.json").exists()}
    if missing:  # a kept --workdir is reused
        write_llamas(missing, shape)
    rows = []
    for rule in rules:
        state = work / f"state-{size}-{rule}"
        shutil.rmtree(state, ignore_errors=True)
        first = timed(
            merge_command(paths[0], state, rule, paths[1], args.workers), args.timeout, ENV
        )
        fold = timed(
            merge_command(paths[0], state, rule, paths[2], args.workers), args.timeout, ENV
        )
        shutil.rmtree(state)
        row = Row(size, shape.parameters, shape.nbytes, rule, first.wall, fold.wall, fold.peak_rss)
        print_row(row)
        save_row(row, args.results)
        rows.append(row)
    return rows


HEADER = (
    f"{'size':>5} {'parameters':>13} {'model':>10} {'rule':>8} {'first fold s':>12} "
    f"{'2nd fold s':>10} {'2nd fold RSS':>12} {'RSS/model':>9}"
)


def print_row(row: Row) -> None:
    print(
        f"{row.size:>5} {row.parameters:>13,} {human(row.nbytes):>10} {row.rule:>8} "
        f"{row.first_wall:12.1f} {row.fold_wall:10.1f} {human(row.fold_rss):>12} "
        f"{row.fold_rss / row.nbytes:9.2f}",
        flush=True,
    )


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display here
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for rule in dict.fromkeys(r.rule for r in rows):
        mine = sorted((r for r in rows if r.rule == rule), key=lambda r: r.parameters)
        x = [r.parameters / 1e9 for r in mine]
        left.plot(x, [r.fold_wall for r in mine], marker="o", label=rule)
        right.plot(x, [r.fold_rss / 2**30 for r in mine], marker="o", label=rule)
    sizes = sorted({(r.parameters, r.nbytes) for r in rows})
    right.plot(
        [p / 1e9 for p, _ in sizes], [b / 2**30 for _, b in sizes], "k--", label="model size (bf16)"
    )
    left.set(xlabel="parameters (billions)", ylabel="seconds", title="one fold, whole process")
    right.set(xlabel="parameters (billions)", ylabel="GiB", title="peak RSS of that process")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("contmerge merge into a disk state (--state), synthetic LLaMA bf16")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Examples: python benchmarks/scaling.py --quick; nice -n 10 python "
        "benchmarks/scaling.py --sizes 250M,1B --plot benchmarks/results/scaling.png",
    )
    parser.add_argument(
        "--sizes",
        default=None,
        help=f"comma-separated, of {', '.join(SHAPES)} (default 250M,1B; --quick: "
        f"{', '.join(QUICK_SHAPES)})",
    )
    parser.add_argument("--rules", default=",".join(RULES), help="comma-separated rules")
    parser.add_argument("--quick", action="store_true", help="two small shapes (5M, 20M)")
    parser.add_argument("--workers", type=int, default=None, help="--workers of each merge")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    parser.add_argument(
        "--workdir", default=None, help="where the models go (kept, and reused by a rerun)"
    )
    parser.add_argument("--timeout", type=float, default=7200.0, help="per process (s)")
    parser.add_argument(
        "--results", type=Path, default=None, help="append each measured row here (JSON lines)"
    )
    parser.add_argument(
        "--merge",
        type=Path,
        action="append",
        default=[],
        help="earlier --results file(s) to print and plot with this run's rows (a row measured "
        "now replaces an earlier one of the same size and rule); --sizes '' measures nothing",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    default = ",".join(QUICK_SHAPES if args.quick else ("250M", "1B"))
    chosen = default if args.sizes is None else args.sizes
    sizes = [s.strip() for s in chosen.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in shapes]
    if unknown:
        print(f"unknown size(s) {unknown}; choose from {', '.join(shapes)}", file=sys.stderr)
        return 2
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    earlier = [row for path in args.merge for row in load_rows(path)]
    if not sizes:
        print(HEADER)
        for row in earlier:
            print_row(row)
        if args.plot:
            plot(earlier, args.plot)
        return 0
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cm-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"models in {work}; each fold a fresh `contmerge merge --state` process")
    print(HEADER)
    rows: list[Row] = []
    try:
        for size in sizes:
            rows += measure(size, shapes[size], rules, work, args)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    measured = {(r.size, r.rule) for r in rows}
    kept = [r for r in earlier if (r.size, r.rule) not in measured]
    if kept:
        print("earlier rows (--merge):")
        for row in kept:
            print_row(row)
    if args.plot:
        plot(kept + rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
