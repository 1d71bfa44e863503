"""Merge a model larger than the memory budget: a ≥ 2 GiB base folded with peak RSS ≤ 1 GiB.

The base (64 tensors of 32 MiB by default) and a few arrivals are written tensor by tensor with
``SafetensorsWriter``, so the generator stays small too. Each strategy then runs in a fresh
process that opens the base, creates a disk state, folds every arrival and emits the merged
model to disk; its whole-process peak RSS (VmHWM, including Python and torch) is compared with
the model's size. Files are removed at the end.

    python benchmarks/out_of_core.py             # 2 GiB model, 3 arrivals
    python benchmarks/out_of_core.py --quick     # 64 MiB model, 2 arrivals, < 1 min
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    GiB,
    MiB,
    arrival_tensor,
    cpu_note,
    human,
    peak_rss_bytes,
    rss_bytes,
    write_model,
)

from contmerge.tensorfile import TensorMeta  # noqa: E402

STRATEGIES = ["magmax", "average", "task_arithmetic"]
BUDGET = 1 * GiB


def metas(tensors: int, tensor_mib: int) -> dict[str, TensorMeta]:
    cols = 2048
    rows = tensor_mib * MiB // (4 * cols)
    return {f"blocks.{i}.weight": TensorMeta((rows, cols), torch.float32) for i in range(tensors)}


def write(path: Path, layout: dict[str, TensorMeta], index: int) -> Path:
    return write_model(path, layout, (arrival_tensor(n, m, index) for n, m in layout.items()))


def child(strategy: str, work: Path, arrivals: int, threads: int) -> None:
    from contmerge import Merger

    torch.set_num_threads(threads)
    started = time.perf_counter()
    state = work / "state"
    with Merger(work / "base.safetensors", strategy, state_dir=state) as merger:
        for t in range(1, arrivals + 1):
            merger.fold(work / f"arrival-{t}.safetensors")
        merger.emit(work / "merged.safetensors")
    print(
        json.dumps(
            {
                "peak": peak_rss_bytes(),
                "end_rss": rss_bytes(),
                "seconds": time.perf_counter() - started,
            }
        )
    )
    shutil.rmtree(state)
    (work / "merged.safetensors").unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB model, 2 arrivals")
    parser.add_argument("--tensors", type=int, default=64, help="number of tensors (64)")
    parser.add_argument("--tensor-mb", type=int, default=32, help="MiB per tensor (32)")
    parser.add_argument("--arrivals", type=int, default=3, help="checkpoints to fold (3)")
    parser.add_argument("--strategies", nargs="*", default=STRATEGIES)
    parser.add_argument("--threads", type=int, default=1, help="torch threads while folding")
    parser.add_argument("--workdir", help="where the files go (default: a temp dir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.workdir), args.arrivals, args.threads)
        return 0
    if args.quick:
        args.tensors, args.tensor_mb, args.arrivals = 8, 8, 2
    layout = metas(args.tensors, args.tensor_mb)
    size = sum(m.nbytes for m in layout.values())
    work = Path(tempfile.mkdtemp(prefix="contmerge-ooc-", dir=args.workdir))
    try:
        started = time.perf_counter()
        write(work / "base.safetensors", layout, 0)
        for t in range(1, args.arrivals + 1):
            write(work / f"arrival-{t}.safetensors", layout, t)
        print(
            f"model {human(size)} ({args.tensors} × {args.tensor_mb} MiB), "
            f"{args.arrivals} arrivals written in {time.perf_counter() - started:.0f} s "
            f"(generator peak RSS {human(peak_rss_bytes())}); {cpu_note()}"
        )
        header = (
            f"{'strategy':18} {'model':>9} {'peak RSS':>9} {'peak/model':>10} "
            f"{'budget':>8} {'seconds':>8}  ok"
        )
        print(header)
        print("-" * len(header))
        for strategy in args.strategies:
            command = [
                sys.executable,
                __file__,
                "--child",
                strategy,
                "--workdir",
                str(work),
                "--arrivals",
                str(args.arrivals),
                "--threads",
                str(args.threads),
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{strategy} failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            ok = row["peak"] <= BUDGET
            print(
                f"{strategy:18} {human(size):>9} {human(row['peak']):>9} "
                f"{row['peak'] / size:10.3f} {human(BUDGET):>8} {row['seconds']:8.1f}  "
                f"{'yes' if ok else 'NO'}"
            )
        print(
            "peak RSS = VmHWM of the whole folding process (open base, create state, fold "
            "every arrival, emit), Python and torch included"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
