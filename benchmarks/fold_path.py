"""Which contmerge functions one durable fold passes through: the engine's shape, measured.

Folds two small synthetic checkpoints with ``average`` into a disk state and records, for the
second fold only, every function of this checkout it enters (``sys.setprofile``): printed as a
call tree (each function once, under the caller that first entered it), then counted. Run it in
the venv of each checkout to compare two versions of the engine, e.g. before and after a reshape:

    git worktree add --detach /tmp/old <commit> && (cd /tmp/old && <its own venv, pip install -e .>)
    python benchmarks/fold_path.py            # this checkout
    /tmp/old/.venv/bin/python benchmarks/fold_path.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from safetensors.torch import save_file

import contmerge
from contmerge import Merger

ROOT = Path(contmerge.__file__).resolve().parents[1]


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    layers = {f"layers.{i}.weight": torch.randn(64, 64, generator=g) for i in range(4)}
    return layers | {"norm.bias": torch.randn(64, generator=g)}


def trace_second_fold(work: Path) -> list[tuple[int, str]]:
    """(depth, "file:qualname") of each function of this checkout, in order of first entry."""
    base = _model(0)
    save_file(base, work / "base.safetensors")
    for k in (1, 2):
        tuned = {n: t + 0.01 * torch.randn_like(t) for n, t in base.items()}
        save_file(tuned, work / f"ft{k}.safetensors")
    seen: set[tuple[str, str]] = set()
    order: list[tuple[int, str]] = []
    depth = 0

    def ours(frame: FrameType) -> bool:
        name = frame.f_code.co_filename
        return name.startswith(str(ROOT)) and "/.venv/" not in name

    def profile(frame: FrameType, event: str, _arg: Any) -> None:
        nonlocal depth
        if event == "call" and ours(frame):
            code = frame.f_code
            if (code.co_filename, code.co_qualname) not in seen:
                seen.add((code.co_filename, code.co_qualname))
                where = Path(code.co_filename).relative_to(ROOT)
                order.append((depth, f"{where}:{code.co_qualname}"))
            depth += 1
        elif event == "return" and ours(frame):
            depth -= 1

    with Merger(work / "base.safetensors", "average", work / "state", progress=False) as merger:
        merger.fold(work / "ft1.safetensors")
        sys.setprofile(profile)
        try:
            merger.fold(work / "ft2.safetensors")
        finally:
            sys.setprofile(None)
    return [(d, name) for d, name in order if "<" not in name]  # no comprehensions or lambdas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=None, help="print the tree to this depth")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        calls = trace_second_fold(Path(work))
    for depth, name in calls:
        if args.depth is None or depth <= args.depth:
            print("  " * depth + name)
    files = sorted({name.split(":")[0] for _, name in calls})
    print(f"\n{len(calls)} distinct functions in {len(files)} files: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
