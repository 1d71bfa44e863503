"""OPCM folds of a MiniLM-sized model with and without busy competitors: old thread use vs the
thread policy (``contmerge.threads``), side by side in one run.

Issue 13 (item 11) saw OPCM folds of MiniLM take 16 s for the first arrival and 111–119 s for
later ones on a busy 2-core machine, most of it in 36 small SVDs: torch's OpenMP pool, as many
threads as cores, each SVD waiting at every barrier for a thread the machine had descheduled.

Configurations, each timed at every load level, in turn (so that drift in the machine's own load
touches all of them alike):

- ``old``: what folds did then: one tensor at a time, torch's intra-op pool of one thread per
  core (OPCM with ``per_tensor_parallel`` off, ``threads`` = the cores).
- ``policy``: the default budget (``default_threads()``): that many of our threads, each folding
  whole tensors with torch single-threaded.
- ``threads=1``: one thread in all.

Load levels: 0, 2 and 4 competitor processes (``python -c "while True: pass"``), started at this
process's nice level (run the script under ``nice -n 10``: they inherit it). Each configuration
folds ``--folds`` arrivals into a fresh in-memory state; the first OPCM fold only stores its
task vector, later ones project (the SVDs), so first and later folds are reported apart.

Prints seconds per fold, later folds ÷ the first, each level ÷ no competitors, and each
configuration ÷ ``old``. Example: nice -n 10 python benchmarks/threads_under_load.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contmerge import Merger, parse_strategy  # noqa: E402
from contmerge.strategy import Strategy  # noqa: E402
from contmerge.threads import available_cores, default_threads  # noqa: E402

#: all-MiniLM-L6-v2: 6 layers, hidden 384, feed-forward 1536, 30522 word pieces
LAYERS, HIDDEN, FFN, VOCAB = 6, 384, 1536, 30522


def minilm_shapes(layers: int = LAYERS, vocab: int = VOCAB) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (vocab, HIDDEN),
        "embeddings.position_embeddings.weight": (512, HIDDEN),
        "embeddings.token_type_embeddings.weight": (2, HIDDEN),
        "embeddings.LayerNorm.weight": (HIDDEN,),
        "embeddings.LayerNorm.bias": (HIDDEN,),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for part, out, inp in (
            ("attention.self.query", HIDDEN, HIDDEN),
            ("attention.self.key", HIDDEN, HIDDEN),
            ("attention.self.value", HIDDEN, HIDDEN),
            ("attention.output.dense", HIDDEN, HIDDEN),
            ("intermediate.dense", FFN, HIDDEN),
            ("output.dense", HIDDEN, FFN),
        ):
            shapes[p + part + ".weight"] = (out, inp)
            shapes[p + part + ".bias"] = (out,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + norm + ".weight"] = (HIDDEN,)
            shapes[p + norm + ".bias"] = (HIDDEN,)
    return shapes


def write_models(work: Path, arrivals: int, quick: bool) -> tuple[Path, list[Path]]:
    """A MiniLM-shaped base and ``arrivals`` fine-tunes of it (a small, partly low-rank δ)."""
    g = torch.Generator().manual_seed(0)
    shapes = minilm_shapes(2, 1000) if quick else minilm_shapes()
    base = {n: torch.randn(s, generator=g) * 0.05 for n, s in shapes.items()}
    save_file(base, work / "base.safetensors")
    paths = []
    for k in range(arrivals):
        tuned = {}
        for name, value in base.items():
            delta = torch.randn(value.shape, generator=g) * 1e-3
            if value.dim() == 2:
                rank = torch.randn(value.shape[0], 4, generator=g)
                delta += 1e-3 * rank @ torch.randn(4, value.shape[1], generator=g)
            tuned[name] = value + delta
        paths.append(work / f"ft{k}.safetensors")
        save_file(tuned, paths[-1])
    return work / "base.safetensors", paths


def serial_opcm() -> Strategy:
    """OPCM as it folded before ``per_tensor_parallel``: one tensor at a time."""
    rule = parse_strategy("opcm")
    serial = type("SerialOPCM", (type(rule),), {"per_tensor_parallel": False})
    return serial(**rule.hparams())


@contextmanager
def competitors(count: int) -> Iterator[None]:
    """``count`` busy loops at this process's nice level (children inherit it)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5 if count else 0)  # let them reach the scheduler
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def fold_seconds(
    base: Path, paths: list[Path], strategy: Strategy | str, threads: int
) -> list[float]:
    before = torch.get_num_threads()
    seconds = []
    with Merger(base, strategy, threads=threads, dedupe=False) as merger:
        for path in paths:
            started = time.perf_counter()
            merger.fold(path)
            seconds.append(time.perf_counter() - started)
    assert torch.get_num_threads() == before, "a fold left torch's thread count changed"
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", type=int, default=3, help="arrivals folded per run")
    parser.add_argument("--loads", default="0,2,4", help="competitor counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration and load")
    parser.add_argument(
        "--quick", action="store_true", help="2 layers, 1000 word pieces, 2 folds, loads 0 and 2"
    )
    args = parser.parse_args()
    if args.quick:
        args.folds, args.loads = 2, "0,2"
    loads = [int(x) for x in args.loads.split(",")]
    cores, budget = available_cores(), default_threads()
    configs: dict[str, tuple[Strategy | str, int]] = {
        "old": (serial_opcm(), cores),
        f"policy({budget})": ("opcm", budget),
        "threads=1": ("opcm", 1),
    }
    print(
        f"{'quick (2 layers): ' if args.quick else ''}usable cores {cores}, "
        f"default budget {budget}, nice {os.nice(0)}, "
        f"load average before {os.getloadavg()[0]:.1f}"
    )
    results: dict[tuple[str, int], list[list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base, paths = write_models(Path(tmp), args.folds, args.quick)
        for load in loads:
            with competitors(load):
                for _ in range(args.repeats):
                    for name, (strategy, threads) in configs.items():
                        runs = results.setdefault((name, load), [])
                        runs.append(fold_seconds(base, paths, strategy, threads))
                        print(
                            f"  {load} competitors, {name}: "
                            + ", ".join(f"{s:.2f}" for s in runs[-1])
                            + " s",
                            flush=True,
                        )

    def first(name: str, load: int) -> float:
        return statistics.median(run[0] for run in results[(name, load)])

    def later(name: str, load: int) -> float:
        return statistics.median(s for run in results[(name, load)] for s in run[1:])

    print("\nseconds per fold (median): first / later; later ÷ first; later ÷ later unloaded")
    for load in loads:
        for name in configs:
            f, t = first(name, load), later(name, load)
            print(
                f"  {load} competitors  {name:<12} first {f:6.2f}  later {t:6.2f}  "
                f"later/first {t / f:5.2f}×  vs unloaded {t / later(name, loads[0]):5.2f}×"
            )
    print("\nlater folds, each configuration ÷ old (below 1: faster than old)")
    for load in loads:
        old = later("old", load)
        print(
            f"  {load} competitors  "
            + "  ".join(f"{n} {later(n, load) / old:5.2f}×" for n in configs if n != "old")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
