"""Peak resident memory of FW-Merging with a pool of 4 vs 20 candidates (goal: ratio ≈ 1).

A synthetic model of tens of MB (an MLP backbone, float32) and its fine-tune-like candidates are
written as safetensors files; each (variant, pool size) then runs in a fresh Python process that
builds a ``FrankWolfeMerger`` over the first N files, runs a few iterations and reports its peak
RSS (VmHWM from /proc/self/status). The objective is cross-entropy on 100 random labelled samples
for each of 4 tasks, with one random head per task, so the gradient really flows through autograd.

    python benchmarks/fw_memory.py                    # hard (task, layer), soft, AdaMerging start
    python benchmarks/fw_memory.py --hidden 1024      # a smaller model

``adamerging:layer`` is FW-hard from the AdaMerging start (the paper's vision headline): the start
streams the pool twice per Adam step (``--ada-iters`` steps), then the FW iterations run.
``door:task`` is FW-hard through ``contmerge merge --strategy fw``'s durable state
(``contmerge.fw_state.FwState``: the pool's content hashes, a commit of θ per iteration, the
objective loaded from a labelled dataset file): ``--variants door:task``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

TASKS = ("t0", "t1", "t2", "t3")
IN_DIM, OUT_DIM, CLASSES, SAMPLES = 512, 256, 10, 100


class Mlp(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_DIM, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.fc3 = nn.Linear(hidden, OUT_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.norm1(self.fc1(x)))
        h = nn.functional.gelu(self.norm2(self.fc2(h)))
        return self.fc3(h)


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_pool(directory: Path, hidden: int, count: int) -> float:
    """Base + ``count`` candidates, written one at a time; returns the model size in MB."""
    from contmerge.tensorfile import write_safetensors

    torch.manual_seed(0)
    base = {k: v.detach().clone() for k, v in Mlp(hidden).state_dict().items()}
    with open(directory / "base.safetensors", "wb") as handle:
        write_safetensors(handle, base)
    for k in range(count):
        g = torch.Generator().manual_seed(k + 1)
        cand = {n: v + 0.02 * torch.randn(v.shape, generator=g) for n, v in base.items()}
        with open(directory / f"cand-{k:02d}.safetensors", "wb") as handle:
            write_safetensors(handle, cand)
        del cand
    return sum(v.numel() * v.element_size() for v in base.values()) / 1e6


def door_model() -> nn.Module:
    """The model the door's objective file names (its width from the environment)."""
    with torch.device("meta"):  # shapes only, as above
        return Mlp(int(os.environ["FW_MEMORY_HIDDEN"]))


def write_objective(path: Path, objective: object) -> None:
    """The benchmark's objective as a labelled dataset file (contmerge.objectives' format)."""
    from contmerge.tensorfile import write_safetensors

    tensors = {}
    for t in TASKS:
        x, y = objective.labelled[t]
        tensors.update({f"x.{t}": x, f"y.{t}": y, f"u.{t}": objective.unlabelled[t]})
        tensors[f"head.{t}.weight"] = objective.heads[t].weight.detach()
        tensors[f"head.{t}.bias"] = objective.heads[t].bias.detach()
    with open(path, "wb") as handle:
        write_safetensors(handle, tensors, {"model": "fw_memory:door_model"})


def door(args: argparse.Namespace, directory: Path, paths: list[Path], objective: object) -> None:
    """FW-hard through the durable state, measured like the other variants."""
    from contmerge.fw_state import FwState

    os.environ["FW_MEMORY_HIDDEN"] = str(args.hidden)
    data = directory / "objective.safetensors"
    write_objective(data, objective)
    with tempfile.TemporaryDirectory() as state_dir:
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])
        before = vm_kib("VmRSS")
        started = time.perf_counter()
        with FwState(state_dir, directory / "base.safetensors", str(data),
                     {"iterations": args.iters}) as state:  # fmt: skip
            state.fold(paths)
            picks = [c for r in state.merger.history for c in r.selected()]
        seconds = time.perf_counter() - started
    print(json.dumps({"pool": args.pool, "variant": "door", "granularity": args.granularity,
                      "rss_before_mib": before / 1024, "peak_mib": vm_kib("VmHWM") / 1024,
                      "seconds": round(seconds, 2), "picked": sorted(set(picks))}))  # fmt: skip


def child(args: argparse.Namespace) -> None:
    """One measurement, in its own process: setup, then FW, reporting RSS before and peak."""
    from contmerge.strategies.frank_wolfe import ClassifierObjective, FrankWolfeMerger

    torch.set_num_threads(1)
    directory = Path(args.dir)
    g = torch.Generator().manual_seed(123)
    heads = {t: nn.Linear(OUT_DIM, CLASSES) for t in TASKS}
    labelled = {
        t: (torch.randn(SAMPLES, IN_DIM, generator=g), torch.randint(0, CLASSES, (SAMPLES,)))
        for t in TASKS
    }
    unlabelled = {t: torch.randn(64, IN_DIM, generator=g) for t in TASKS}
    with torch.device("meta"):  # shapes only: FW passes θ in, so the module holds no weights
        model = Mlp(args.hidden)
    objective = ClassifierObjective(model, heads, labelled, unlabelled)
    paths = sorted(directory.glob("cand-*.safetensors"))[: args.pool]
    if args.variant == "door":
        door(args, directory, paths, objective)
        return
    with tempfile.TemporaryDirectory() as work:
        adamerging = args.variant == "adamerging"
        fw = FrankWolfeMerger(
            directory / "base.safetensors",
            paths,
            objective,
            "hard" if adamerging else args.variant,
            args.granularity,
            init="adamerging" if adamerging else None,
            adamerging_iters=args.ada_iters,
            ada_iters=args.ada_iters,
            work_dir=work,
        )
        # Adam's first use imports torch._dynamo (~70 MB of code): a library constant, not FW's
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])
        before = vm_kib("VmRSS")
        started = time.perf_counter()
        fw.run(args.iters)
        seconds = time.perf_counter() - started
        picks = [c for r in fw.history for key in r.choices for c in r.selected(key)]
        fw.close()
    print(
        json.dumps(
            {
                "pool": args.pool,
                "variant": args.variant,
                "granularity": args.granularity,
                "rss_before_mib": before / 1024,
                "peak_mib": vm_kib("VmHWM") / 1024,
                "seconds": round(seconds, 2),
                "picked": sorted(set(picks)),
            }
        )
    )


def measure(directory: Path, pool: int, variant: str, granularity: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--dir",
        str(directory),
        "--pool",
        str(pool),
        "--variant",
        variant,
        "--granularity",
        granularity,
        "--hidden",
        str(args.hidden),
        "--iters",
        str(args.iters),
        "--ada-iters",
        str(args.ada_iters),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--hidden", type=int, default=2048, help="MLP width (2048: 34 MB of float32 weights)"
    )
    parser.add_argument("--pools", default="4,20", help="pool sizes to compare, first vs last")
    parser.add_argument(
        "--variants",
        default="hard:task,hard:layer,soft:task,adamerging:layer",
        help="variant:granularity list (adamerging: FW-hard from the AdaMerging start)",
    )
    parser.add_argument("--iters", type=int, default=2, help="FW iterations per measurement")
    parser.add_argument(
        "--ada-iters",
        type=int,
        default=3,
        help="soft / AdaMerging start: Adam steps (memory does not depend on it)",
    )
    parser.add_argument("--dir", default=None, help="pool directory (default: a temp dir)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pool", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="hard", help=argparse.SUPPRESS)
    parser.add_argument("--granularity", default="task", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    pools = [int(p) for p in args.pools.split(",")]
    variants = [v.split(":") for v in args.variants.split(",")]
    with tempfile.TemporaryDirectory(prefix="fw-memory-") as tmp:
        directory = Path(args.dir) if args.dir else Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        size_mb = make_pool(directory, args.hidden, max(pools))
        print(
            f"model: {size_mb:.1f} MB float32 per checkpoint; pools {pools}; "
            f"{args.iters} iterations; pid {os.getpid()}"
        )
        print("| variant | pool | RSS before FW (MiB) | peak RSS (MiB) | FW extra (MiB) | s |")
        print("|---|---|---|---|---|---|")
        for variant, granularity in variants:
            rows = [measure(directory, p, variant, granularity, args) for p in pools]
            for r in rows:
                extra = r["peak_mib"] - r["rss_before_mib"]
                print(
                    f"| {variant}/{granularity} | {r['pool']} | {r['rss_before_mib']:.0f} | "
                    f"{r['peak_mib']:.0f} | {extra:.0f} | {r['seconds']} |"
                )
            first, last = rows[0], rows[-1]
            ratio = last["peak_mib"] / first["peak_mib"]
            extra_ratio = (last["peak_mib"] - last["rss_before_mib"]) / max(
                first["peak_mib"] - first["rss_before_mib"], 1e-9
            )
            print(
                f"  {variant}/{granularity}: peak RSS ratio pool {pools[-1]} / pool {pools[0]}"
                f" = {ratio:.3f} (FW's own extra: {extra_ratio:.3f})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
