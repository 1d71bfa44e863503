"""Fold throughput (bytes of arrival per second) against this machine's own memory copy.

In one run, side by side:
- memcpy: a numpy copy of the model's size into a preallocated buffer: the target's reference
  (fold ≥ 0.5× memcpy for elementwise rules). Each row times its own copies, one before each of
  its folds, and compares the best of each (memory bandwidth drifts on a shared machine);
- traffic floor: the memory traffic no elementwise fold can avoid with the state in memory: the
  engine's own fused loop (task arithmetic's) over arrays already in memory, in chunks taken by
  the same number of threads as the fold. It reads arrival, base and state and streams the new
  state out, 4 model sizes against memcpy's 2; the engine adds reading the arrival's file, the
  content hash and Python between chunks;
- disk floor: writing the state's size into the previous generation's file and fsync-ing it,
  which every durable commit must do;
- each rule folding synthetic safetensors arrivals (best of 5 after a warm-up), state in memory
  and on disk, with 1 fold thread and with the default; OPCM timed and profiled.

Beside the wall-clock ratio each row prints the same ratio in CPU time (the process's, every
thread's summed, for the copy and for the fold): on a machine shared with other jobs a short copy
often runs undisturbed while a longer fold waits for the cores, and the CPU ratio is what that
leaves out. On an idle machine a fold on one thread has the two ratios equal.

    python benchmarks/throughput.py              # 256 MiB model
    python benchmarks/throughput.py --quick      # 64 MiB model, < 1 min
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Layout, Memcpy, MiB, cpu_note, human, write_checkpoint  # noqa: E402

from contmerge import Merger  # noqa: E402
from contmerge.chunks import ChunkRunner, default_workers  # noqa: E402
from contmerge.elementwise import CHUNK_BYTES  # noqa: E402
from contmerge.kernels import fused_fold, keep_delta  # noqa: E402
from contmerge.strategies.task_arithmetic import TaskArithmetic  # noqa: E402
from contmerge.strategy import FoldContext  # noqa: E402

ELEMENTWISE = ["average", "task_arithmetic", "magmax", "chain(dare(p=0.9), magmax())"]
#: elementwise too, after passes over the whole model for its exact global thresholds
OTHERS = ["ties"]
TARGET = 0.5
TARGETS = {"ties": 0.1}  # a look at a sample and an exact pass before its fold


# task arithmetic's loop for an arrival of weight 1 (the rule reads only the context's weight)
_FLOOR_LOOP = fused_fold(
    keep_delta,
    TaskArithmetic().entry_fold(None, FoldContext(index=2, globals={})).update,  # type: ignore[arg-type]
)


class TrafficFloor:
    """The fold's unavoidable memory traffic as one compiled loop over arrays in memory."""

    def __init__(self, nbytes: int, workers: list[int]) -> None:
        n = nbytes // 4
        self.arrays = [np.full(n, 1.0, dtype=np.float32) for _ in range(4)]
        self.runners = {w: ChunkRunner(w) for w in workers}
        chunk = CHUNK_BYTES // 4
        self.bounds = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]

    def _run(self, bounds: tuple[int, int]) -> None:
        a, b = bounds
        x, base, state, out = self.arrays
        _FLOOR_LOOP((), (), np.uint64(a), x[a:b], base[a:b], state[a:b], out[a:b])

    def seconds(self, workers: int) -> float:
        started = time.perf_counter()
        self.runners[workers].map(self.bounds, self._run)
        return time.perf_counter() - started

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()


def disk_floor_seconds(work: Path, nbytes: int, repeats: int = 3) -> float:
    """Overwrite a file of ``nbytes`` in place and fsync it (a durable commit's least work)."""
    path = work / "disk-floor.bin"
    piece = memoryview(np.ones(1 << 20, dtype=np.uint8))
    with open(path, "wb") as handle:
        for _ in range(nbytes // len(piece)):
            handle.write(piece)
    best = float("inf")
    for _ in range(repeats):
        fd = os.open(path, os.O_WRONLY)
        started = time.perf_counter()
        for offset in range(0, nbytes - len(piece) + 1, len(piece)):
            os.pwrite(fd, piece, offset)
        os.fsync(fd)
        best = min(best, time.perf_counter() - started)
        os.close(fd)
    path.unlink()
    return best


def fold_seconds(
    strategy: str, work: Path, durable: bool, workers: int, memcpy: Memcpy, floor: TrafficFloor
) -> dict[str, float]:
    """Best of five folds after a warm-up (the arrivals in turn, each folded anew), with the best
    of the copies and of the traffic floors timed just before each of them; wall-clock seconds,
    and the process's CPU seconds of the copies and the folds ("copy cpu", "fold cpu")."""
    state = work / "state" if durable else None
    best = dict.fromkeys(("fold", "copy", "floor", "fold cpu", "copy cpu"), float("inf"))
    with Merger(
        work / "base.safetensors", strategy, state_dir=state, workers=workers, dedupe=False
    ) as merger:
        merger.fold(work / "a1.safetensors")
        for t in (2, 3, 1, 2, 3):
            cpu = time.process_time()
            best["copy"] = min(best["copy"], memcpy.seconds())
            best["copy cpu"] = min(best["copy cpu"], time.process_time() - cpu)
            best["floor"] = min(best["floor"], floor.seconds(workers))
            started, cpu = time.perf_counter(), time.process_time()
            merger.fold(work / f"a{t}.safetensors")
            best["fold"] = min(best["fold"], time.perf_counter() - started)
            best["fold cpu"] = min(best["fold cpu"], time.process_time() - cpu)
    if state is not None:
        shutil.rmtree(state)
    return best


def profile_opcm(work: Path, top: int, workers: list[int]) -> None:
    for count in workers:  # wall time per fold with each number of fold threads
        with Merger(work / "base.safetensors", "opcm", workers=count) as merger:
            merger.fold(work / "a1.safetensors")
            started = time.perf_counter()
            merger.fold(work / "a2.safetensors")
            print(
                f"\nOPCM: {time.perf_counter() - started:.2f} s per fold (2nd arrival, memory "
                f"state), {count} fold thread(s)"
            )
    # cProfile sees one thread: the profiled fold runs on one
    with Merger(work / "base.safetensors", "opcm", workers=1) as merger:
        merger.fold(work / "a1.safetensors")
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        merger.fold(work / "a2.safetensors")
        profiler.disable()
        seconds = time.perf_counter() - started
    stats = pstats.Stats(profiler)
    basis = sum(
        row[3]
        for func, row in stats.stats.items()
        if func[2] == "singular_basis"  # type: ignore[attr-defined]
    )
    print(
        f"OPCM profiled on 1 thread: {seconds:.2f} s per fold; SVD basis (float64 Gram "
        f"eigendecomposition) {basis:.2f} s ({basis / seconds:.0%}), the rest "
        f"{seconds - basis:.2f} s"
    )
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    print("cProfile, by own time:")
    print("\n".join(lines[start : start + top + 1]))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="64 MiB model, fewer rows")
    parser.add_argument("--mb", type=float, default=256, help="model size in MiB (256)")
    parser.add_argument("--hidden", type=int, default=1024, help="width of the square linears")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="*",
        default=sorted({1, default_workers()}),
        help="fold thread counts to measure side by side (default: 1 and the engine's default)",
    )
    parser.add_argument("--strategies", nargs="*", default=ELEMENTWISE + OTHERS)
    parser.add_argument("--no-opcm", action="store_true", help="skip OPCM's timing and profile")
    parser.add_argument("--top", type=int, default=12, help="cProfile entries to show")
    parser.add_argument("--workdir", help="where the files go (default: a temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.mb, args.hidden, args.top = 64, 512, 8
    torch.set_num_threads(1)  # per-tensor rules on one torch thread: comparable across loads
    layout = Layout.of_size(int(args.mb * MiB), args.hidden)
    size = layout.nbytes
    work = Path(tempfile.mkdtemp(prefix="contmerge-tp-", dir=args.workdir))
    try:
        for t in range(4):
            write_checkpoint(
                work / ("base.safetensors" if t == 0 else f"a{t}.safetensors"), layout, t
            )
        memcpy, floor = Memcpy(size), TrafficFloor(size, args.workers)
        copy = memcpy.best()
        disk = disk_floor_seconds(work, size)
        print(f"model {human(size)} ({len(layout.metas())} tensors); {cpu_note()}")
        print(f"numpy memcpy:   {size / copy / 1e9:6.2f} GB/s (best of 5) = the reference")
        for w in args.workers:
            seconds = min(floor.seconds(w) for _ in range(5))
            print(
                f"traffic floor:  {size / seconds / 1e9:6.2f} GB/s = {copy / seconds:.3f}× memcpy "
                f"on {w} thread(s) (arrival, base, state in; new state streamed out; in memory)"
            )
        print(
            f"disk floor:     {size / disk / 1e9:6.2f} GB/s = {copy / disk:.3f}× memcpy "
            "(overwrite the state's size in place + fsync)"
        )
        print(
            "\nEach row: best of 5 folds; memcpy and the traffic floor timed again before each "
            "fold, so\nthe ratios compare times taken moments apart (bandwidth drifts here)."
        )
        header = (
            f"{'strategy':30} {'state':6} {'workers':>7} {'GB/s':>6} {'memcpy':>6} "
            f"{'vs memcpy':>9} {'vs floor':>8} {'cpu ratio':>9}  target {TARGET}× memcpy, "
            f"ties {TARGETS['ties']}× (state in memory)"
        )
        print(header)
        print("-" * len(header))
        for strategy in args.strategies:
            for workers in args.workers:
                for durable in (False, True):
                    row = fold_seconds(strategy, work, durable, workers, memcpy, floor)
                    seconds = row["fold"]
                    ratio = row["copy"] / seconds
                    # a durable fold's floor is the disk's, a memory fold's the traffic floor
                    against = disk if durable else row["floor"]
                    target = TARGETS.get(strategy, TARGET)
                    # TIES is held to its target with the state in memory (a durable fold
                    # also writes the state out: the disk floor, far below 0.1× here)
                    held = strategy in ELEMENTWISE or not durable
                    verdict = ("met" if ratio >= target else "missed") if held else ""
                    print(
                        f"{strategy:30} {'disk' if durable else 'memory':6} {workers:7d} "
                        f"{size / seconds / 1e9:6.2f} {size / row['copy'] / 1e9:6.2f} "
                        f"{ratio:9.3f} {against / seconds:8.3f} "
                        f"{row['copy cpu'] / row['fold cpu']:9.3f}  {verdict}",
                        flush=True,
                    )
        floor.close()
        if not args.no_opcm:
            profile_opcm(work, args.top, args.workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
