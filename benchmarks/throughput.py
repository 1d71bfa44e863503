"""Fold throughput (bytes of arrival per second) against this machine's own memory copy.

In one run: a numpy copy of the model's size into a preallocated buffer (best of 5) is the
reference; the "read floor" is what the engine cannot avoid without memory maps, reading the
arrival and the base once each into fresh buffers. Each elementwise strategy then folds a
synthetic safetensors arrival (the 2nd and 3rd of a run; best of the two) with the state in
memory and on disk, at each torch thread count asked for. OPCM is timed per fold and profiled
(SVD vs the rest, and cProfile's top entries).

    python benchmarks/throughput.py              # 256 MiB model
    python benchmarks/throughput.py --quick      # 32 MiB model, < 1 min
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Layout, MiB, cpu_note, human, memcpy_seconds, write_checkpoint  # noqa: E402

from contmerge import Merger  # noqa: E402
from contmerge.sources import SafetensorsCheckpoint  # noqa: E402

ELEMENTWISE = ["average", "task_arithmetic", "magmax", "ties", "chain(dare(p=0.9), magmax())"]
TARGET = 0.5


def read_floor_seconds(work: Path, repeats: int = 2) -> float:
    """Read the arrival and the base once, tensor by tensor, into fresh buffers (best of n)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for path in (work / "a2.safetensors", work / "base.safetensors"):
            with SafetensorsCheckpoint(path) as checkpoint:
                for name in checkpoint.keys():
                    checkpoint.read(name)
        best = min(best, time.perf_counter() - started)
    return best


def fold_seconds(strategy: str, work: Path, durable: bool) -> float:
    """Best of folding the 2nd and the 3rd arrival (the 1st is a warm-up)."""
    state = work / "state" if durable else None
    with Merger(work / "base.safetensors", strategy, state_dir=state) as merger:
        merger.fold(work / "a1.safetensors")
        best = float("inf")
        for t in (2, 3):
            started = time.perf_counter()
            merger.fold(work / f"a{t}.safetensors")
            best = min(best, time.perf_counter() - started)
    if state is not None:
        shutil.rmtree(state)
    return best


def profile_opcm(work: Path, top: int) -> None:
    with Merger(work / "base.safetensors", "opcm") as merger:
        merger.fold(work / "a1.safetensors")
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        merger.fold(work / "a2.safetensors")
        profiler.disable()
        seconds = time.perf_counter() - started
    stats = pstats.Stats(profiler)
    svd = sum(
        row[3]
        for func, row in stats.stats.items()
        if "svd" in func[2]  # type: ignore[attr-defined]
    )
    print(
        f"\nOPCM: {seconds:.2f} s per fold (2nd arrival, memory state); SVD {svd:.2f} s "
        f"({svd / seconds:.0%}), the rest {seconds - svd:.2f} s"
    )
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    print("cProfile, by own time:")
    print("\n".join(lines[start : start + top + 1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 MiB model (CI smoke run)")
    parser.add_argument("--mb", type=float, default=256, help="model size in MiB (256)")
    parser.add_argument("--hidden", type=int, default=1024, help="width of the square linears")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="*",
        default=[1, torch.get_num_threads()],
        help="torch thread counts to measure side by side (default: 1 and torch's default)",
    )
    parser.add_argument("--strategies", nargs="*", default=ELEMENTWISE)
    parser.add_argument("--no-opcm", action="store_true", help="skip OPCM's timing and profile")
    parser.add_argument("--top", type=int, default=12, help="cProfile entries to show")
    parser.add_argument("--workdir", help="where the files go (default: a temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.mb, args.hidden, args.threads, args.top = 32, 512, [1], 8
    threads = list(dict.fromkeys(args.threads))
    layout = Layout.of_size(int(args.mb * MiB), args.hidden)
    size = layout.nbytes
    work = Path(tempfile.mkdtemp(prefix="contmerge-tp-", dir=args.workdir))
    try:
        for t in range(4):
            write_checkpoint(
                work / ("base.safetensors" if t == 0 else f"a{t}.safetensors"), layout, t
            )
        copy = memcpy_seconds(size)
        floor = read_floor_seconds(work)
        print(
            f"model {human(size)} ({len(layout.metas())} tensors, linears "
            f"{args.hidden}×{args.hidden}); {cpu_note()}"
        )
        print(f"numpy memcpy: {size / copy / 1e9:6.2f} GB/s (best of 5)")
        print(
            f"read floor:   {size / floor / 1e9:6.2f} GB/s = {copy / floor:.3f}× memcpy "
            "(pread of arrival + base into fresh buffers; an upper bound for any fold)"
        )
        header = (
            f"{'strategy':30} {'state':6} {'threads':>7} {'GB/s':>6} {'vs memcpy':>9} "
            f"{'vs floor':>8}  target {TARGET}"
        )
        print(header)
        print("-" * len(header))
        for count in threads:
            torch.set_num_threads(count)
            for strategy in args.strategies:
                for durable in (False, True):
                    seconds = fold_seconds(strategy, work, durable)
                    ratio = copy / seconds
                    print(
                        f"{strategy:30} {'disk' if durable else 'memory':6} {count:7d} "
                        f"{size / seconds / 1e9:6.2f} {ratio:9.3f} {floor / seconds:8.3f}  "
                        f"{'met' if ratio >= TARGET else 'missed'}"
                    )
        if not args.no_opcm:
            torch.set_num_threads(threads[0])
            profile_opcm(work, args.top)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
