"""Peak memory of one agent's DIMAT merge with few vs many neighbours.

Saves an anchor and up to K neighbour models (an MLP with BatchNorm, different random inits) as
.safetensors, then runs each merge in a fresh subprocess. The subprocess builds its calibration
batches, resets the kernel's peak-RSS counter (``5 > /proc/self/clear_refs``), merges (each
neighbour loaded from disk only when it is folded), and reports VmHWM. The ratio of the peaks
with 8 vs 2 neighbours should be ≈ 1 for the pairwise fold. ``--mode all-at-once`` loads every
neighbour first, as the reference code holds the whole neighbourhood, for contrast.
``--mode state`` goes through the CLI's door, ``contmerge.dimat_state.DimatState`` (content
hashes, a durable commit of the accumulator after each neighbour, calibration from an entry
point), as ``contmerge merge --strategy dimat`` runs it.

Calibration inputs are random: the memory of the merge does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("pairwise", "all-at-once", "state")


def _model(model: str, width: int):
    """(factory, spec) of the decentralized scenario's MLP (784-w-w-10, BatchNorm) or CNN."""
    from contmerge.simulations.cnn import agent_model

    return agent_model(model, width, 10)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM <- current RSS


def _calibration_batches(model: str) -> list:
    import torch

    n_calib = 64 if model == "cnn" else 512  # the CNN's forward passes are the slow part
    gen = torch.Generator().manual_seed(0)
    return list(torch.rand(n_calib, 784, generator=gen).split(64))


def calibration() -> object:
    """The entry point ``--mode state`` names (model and width from the environment)."""
    from contmerge.objectives import Calibration

    model, width = os.environ["DIMAT_MEMORY_MODEL"], int(os.environ["DIMAT_MEMORY_WIDTH"])
    factory, spec = _model(model, width)
    return Calibration(factory, _calibration_batches(model), spec)


def state_worker(directory: Path, k: int, model: str, width: int) -> dict:
    import torch

    from contmerge.dimat_state import DimatState

    torch.set_num_threads(1)
    os.environ.update(DIMAT_MEMORY_MODEL=model, DIMAT_MEMORY_WIDTH=str(width))
    paths = [directory / "anchor.safetensors"]
    paths += [directory / f"neighbour{j}.safetensors" for j in range(k)]
    _reset_peak()
    before = _status_kb("VmRSS")
    with tempfile.TemporaryDirectory(prefix="dimat-state-") as state:
        with DimatState(state, "dimat_memory:calibration") as fold:
            fold.fold(paths)
            merged = fold.merged()
    peak = _status_kb("VmHWM")
    assert merged
    return {"neighbours": k, "mode": "state", "rss_before_kb": before, "peak_kb": peak}


def worker(directory: Path, k: int, mode: str, model: str, width: int) -> dict:
    import torch

    from contmerge.strategies.dimat import DimatFold, load_source

    torch.set_num_threads(1)
    if mode == "state":
        return state_worker(directory, k, model, width)
    factory, spec = _model(model, width)
    calibration = _calibration_batches(model)
    paths = [directory / f"neighbour{j}.safetensors" for j in range(k)]
    weight = 1.0 / (k + 1)
    _reset_peak()
    before = _status_kb("VmRSS")
    sources = [load_source(p) for p in paths] if mode == "all-at-once" else paths
    fold = DimatFold(
        directory / "anchor.safetensors",
        weight,
        model_factory=factory,
        spec=spec,
        calibration=calibration,
    )
    for source in sources:
        fold.add(source, weight)
    del sources
    merged = fold.finish()
    peak = _status_kb("VmHWM")
    assert len(merged) == len(factory().state_dict())
    return {"neighbours": k, "mode": mode, "rss_before_kb": before, "peak_kb": peak}


def prepare(directory: Path, k: int, model: str, width: int) -> int:
    import safetensors.torch
    import torch

    factory, _ = _model(model, width)
    size = 0
    for j, name in enumerate(["anchor"] + [f"neighbour{i}" for i in range(k)]):
        torch.manual_seed(j)
        state = factory().state_dict()
        size = sum(t.numel() * t.element_size() for t in state.values())
        safetensors.torch.save_file(state, str(directory / f"{name}.safetensors"))
    return size


def run(counts: list[int], modes: list[str], model: str, width: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="dimat-mem-") as tmp:
        directory = Path(tmp)
        model_bytes = prepare(directory, max(counts), model, width)
        rows = []
        for mode in modes:
            for k in counts:
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    str(directory),
                    "--neighbours",
                    str(k),
                    "--modes",
                    mode,
                    "--model",
                    model,
                    "--width",
                    str(width),
                ]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
    stats = sum(d * d * 8 for d in _point_sizes(model, width))
    return {
        "model": model,
        "model_bytes": model_bytes,
        "width": width,
        "statistics_bytes": stats,
        "rows": rows,
    }


def _point_sizes(model: str, width: int) -> list[int]:
    factory, spec = _model(model, width)
    return list(spec.sizes(factory().state_dict()).values())


def report(result: dict) -> str:
    mb = result["model_bytes"] / 2**20
    name = (
        f"MLP 784-{result['width']}-{result['width']}-10 with BatchNorm"
        if result["model"] == "mlp"
        else f"SmallResNet width {result['width']}"
    )
    lines = [
        f"model: {name}, {mb:.1f} MiB per model; float64 cross-moments of all alignment "
        f"points: {result['statistics_bytes'] / 2**20:.1f} MiB",
        "",
        "| mode | neighbours | peak RSS (MiB) | peak − RSS before merge (MiB) | in models |",
        "|---|---|---|---|---|",
    ]
    by_mode: dict[str, list[dict]] = {}
    for row in result["rows"]:
        delta = (row["peak_kb"] - row["rss_before_kb"]) / 1024
        by_mode.setdefault(row["mode"], []).append(row)
        lines.append(
            f"| {row['mode']} | {row['neighbours']} | {row['peak_kb'] / 1024:.0f} | "
            f"{delta:.0f} | {delta / mb:.1f} |"
        )
    lines.append("")
    for mode, rows in by_mode.items():
        lo, hi = rows[0], rows[-1]
        ratio = hi["peak_kb"] / lo["peak_kb"]
        d_lo = lo["peak_kb"] - lo["rss_before_kb"]
        d_hi = hi["peak_kb"] - hi["rss_before_kb"]
        lines.append(
            f"{mode}: peak RSS ratio {hi['neighbours']} vs {lo['neighbours']} "
            f"neighbours = {ratio:.2f} (merge's own memory: {d_hi / d_lo:.2f})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neighbours", default="2,8", help="comma-separated neighbour counts")
    parser.add_argument(
        "--modes", default="pairwise", help=f"comma-separated subset of {', '.join(MODES)}"
    )
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument(
        "--width",
        type=int,
        default=None,
        help="MLP hidden width (default 2048) or CNN width (default 64)",
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON too")
    parser.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.neighbours.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    for m in modes:
        if m not in MODES:
            parser.error(f"unknown mode {m!r}; known: {', '.join(MODES)}")
    width = args.width or (64 if args.model == "cnn" else 2048)
    if args.worker:
        print(json.dumps(worker(Path(args.worker), counts[0], modes[0], args.model, width)))
        return 0
    result = run(counts, modes, args.model, width)
    print(report(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
