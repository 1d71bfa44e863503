"""Peak RSS while folding the t-th model vs the 2nd, for every strategy (durable state on disk).

Each strategy runs in its own fresh process that folds T synthetic safetensors checkpoints one
after another into a disk state (as a long-running merge service would, so a leak that grows
with t shows). Before each fold the arrival (and its Fisher / Gram sidecar) is generated, then
the kernel's peak-RSS mark is reset (``/proc/self/clear_refs`` ← 5) and VmHWM is read after the
fold: the peak of that fold alone.

    python benchmarks/memory_constant.py            # ~256 MiB model, T = 24
    python benchmarks/memory_constant.py --quick    # small model, T = 4, < 1 min
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    Layout,
    MiB,
    cpu_note,
    human,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    write_checkpoint,
    write_fisher,
    write_gram,
)

STRATEGIES = [
    "average",
    "task_arithmetic",
    "ties",
    "magmax",
    "opcm",
    "fisher",
    "regmean",
    "chain(dare(p=0.9), magmax())",
]
TARGET = 1.05


def child(args: argparse.Namespace) -> None:
    """Fold T arrivals into a fresh disk state; one JSON line per fold on stdout."""
    import torch

    from contmerge import Merger

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    layout = Layout(args.hidden, args.layers)
    state = work / f"state-{abs(hash(args.strategy))}"
    with Merger(work / "base.safetensors", args.strategy, state_dir=state) as merger:
        for t in range(1, args.folds + 1):
            arrival = write_checkpoint(work / f"arrival-{t}.safetensors", layout, t)
            sidecars = []
            if "fisher" in args.strategy:
                sidecars.append(write_fisher(work / f"arrival-{t}.fisher.safetensors", layout, t))
            if "regmean" in args.strategy:
                sidecars.append(write_gram(work / f"arrival-{t}.gram.safetensors", layout, t))
            gc.collect()
            reset_peak_rss()
            before = rss_bytes()
            started = time.perf_counter()
            merger.fold(arrival)
            seconds = time.perf_counter() - started
            peak = peak_rss_bytes()
            for path in (arrival, *sidecars):
                path.unlink()
            print(
                json.dumps({"t": t, "peak": peak, "before": before, "seconds": seconds}), flush=True
            )
    shutil.rmtree(state)


def run_strategy(strategy: str, args: argparse.Namespace, work: Path) -> list[dict]:
    command = [
        sys.executable,
        __file__,
        "--child",
        strategy,
        "--workdir",
        str(work),
        "--hidden",
        str(args.hidden),
        "--layers",
        str(args.layers),
        "--folds",
        str(args.folds),
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{strategy} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, T = 4 (CI smoke run)")
    parser.add_argument("--mb", type=float, default=256, help="model size in MiB (default 256)")
    parser.add_argument("--hidden", type=int, default=512, help="width of the square linears")
    parser.add_argument("--folds", type=int, default=24, help="T: how many models to fold")
    parser.add_argument("--strategies", nargs="*", default=STRATEGIES, help="specs to measure")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in the folding process (default 1: on a shared 2-core machine "
        "OpenMP's spinning threads make every op ~20× slower; see README)",
    )
    parser.add_argument("--workdir", help="where checkpoints and states go (default: a temp dir)")
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.strategy = args.child
        child(args)
        return 0
    if args.quick:
        args.mb, args.hidden, args.folds = 8, 128, 4
    layout = Layout.of_size(int(args.mb * MiB), args.hidden)
    args.layers = layout.layers
    work = Path(tempfile.mkdtemp(prefix="contmerge-mem-", dir=args.workdir))
    try:
        write_checkpoint(work / "base.safetensors", layout, 0)
        print(
            f"model {human(layout.nbytes)} ({len(layout.metas())} tensors, linears "
            f"{args.hidden}×{args.hidden}), T = {args.folds}, disk state, folding with "
            f"{args.threads} torch thread(s); {cpu_note()}"
        )
        header = (
            f"{'strategy':32} {'peak t=2':>10} {f'peak t={args.folds}':>10} {'ratio':>6}"
            f" {'fold Δ t=2':>11} {f'fold Δ t={args.folds}':>11} {'Δ ratio':>7}"
            f" {'s/fold':>7}  ok"
        )
        print(header)
        print("-" * len(header))
        worst = 0.0
        for strategy in args.strategies:
            rows = {row["t"]: row for row in run_strategy(strategy, args, work)}
            second, last = rows[2], rows[args.folds]
            ratio = last["peak"] / second["peak"]
            grow = [r["peak"] - r["before"] for r in (second, last)]
            worst = max(worst, ratio)
            seconds = sum(r["seconds"] for r in rows.values()) / len(rows)
            print(
                f"{strategy:32} {human(second['peak']):>10} {human(last['peak']):>10} "
                f"{ratio:6.3f} {human(grow[0]):>11} {human(grow[1]):>11} "
                f"{grow[1] / max(grow[0], 1):7.3f} {seconds:7.2f}  "
                f"{'yes' if ratio <= TARGET else 'NO'}"
            )
        print(f"worst peak ratio t={args.folds} / t=2: {worst:.3f} (target ≤ {TARGET})")
        print("peak = VmHWM of the fold (process total); fold Δ = peak − RSS just before it")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
