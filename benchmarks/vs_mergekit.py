"""Side by side with mergekit on LLM-sized checkpoints: whole processes, wall time and peak RSS.

What it does, in one run:

1. Creates (or reuses) a venv for mergekit (default ``~/.cache/contmerge/mergekit-venv``):
   ``pip install torch==2.13.0`` first, then ``mergekit==0.1.5``.
2. Writes a synthetic LLaMA-architecture base (hidden 1024, 14 layers, intermediate 2816, vocab
   32000: 245M parameters, bf16, 3 shards, config.json) and ``--models`` variants of it (base +
   small seeded noise); ``--quick``: a 5M-parameter shape.
3. Runs each case ``--rounds`` times, mergekit and ours alternated (their order flips every
   round), every command a fresh process timed from start to exit, its peak RSS from wait4:
   - 4 models, ``average`` vs mergekit's ``linear`` (normalised), and ``task_arithmetic`` (λ 0.3)
     vs mergekit's ``task_arithmetic`` (weight 0.3): ours as two commands (``merge``, then
     ``emit``) and as one (``merge --out``), from no state;
   - a 5th arrives: ours folds it into the state of 4 (copied into place untimed) and emits, as
     two commands and as one; mergekit merges all 5 again;
   - 16 models in one process each, and the 16th arriving into a state of 15;
   - a no-op ``merge`` of the 4 already folded.
   Both sides compute in float32 and write bf16 (mergekit ``dtype: float32``, ``out_dtype:
   bfloat16``); both use this machine's cores (mergekit: torch's threads; ours: fold threads).
4. Prints per case the medians and the per-round spread of wall time and peak RSS, ours / theirs,
   and the disk floors beside them: reading every input once (sequential, 16 MiB reads, from the
   page cache where the files are cached) and writing the output once with fsync. Outputs are
   checked equal to mergekit's within bf16 rounding (max difference in bf16 ulps).

If mergekit cannot be installed or run, it prints the failing step and exits 0 (not our bug).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import _venv
import torch
from _common import human
from _llama import LlamaShape, write_llama
from _process import Run, timed
from _venv import TheirFailure, venv_python

from contmerge import open_checkpoint

DEFAULT_VENV = Path(
    os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "contmerge", "mergekit-venv"
)
MERGEKIT = "mergekit==0.1.5"
QUICK_SHAPE = LlamaShape(hidden=256, layers=4, intermediate=704, vocab=4000, heads=4)
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
SCALING = 0.3  # task arithmetic's λ, ours' default
CASE_GROUPS = ("four", "fifth", "noop", "many")


@dataclass
class Side:
    """One way of doing a case: setup (untimed) then its commands, each a timed process."""

    label: str
    commands: Callable[[Path], list[list[str]]]  # given a fresh output path
    setup: Callable[[], None] = lambda: None
    runs: list[Run] = field(default_factory=list)
    output: Path | None = None


@dataclass
class Case:
    title: str
    theirs: Side | None
    ours: list[Side]
    inputs: int  # bytes read, for the floor
    output: int  # bytes written


def run_side(side: Side, out: Path, timeout: float) -> None:
    side.setup()
    if out.exists():
        shutil.rmtree(out)
    wall, peak = 0.0, 0
    for command in side.commands(out):
        one = timed(command, timeout, ENV)
        wall, peak = wall + one.wall, max(peak, one.peak_rss)
    side.runs.append(Run(wall, peak))
    side.output = out


# --- mergekit ---------------------------------------------------------------------------------


def ensure_mergekit(venv: Path, timeout: float) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m, torch, mergekit.merge;"
        "print(json.dumps({'torch': torch.__version__, 'mergekit': m.version('mergekit'),"
        " 'transformers': m.version('transformers')}))"
    )
    return _venv.ensure_venv(venv, "mergekit", [MERGEKIT], code, ENV, timeout)


def mergekit_config(path: Path, method: str, models: list[Path], base: Path) -> Path:
    """A mergekit config (JSON is YAML) computing in float32 and writing bf16."""
    if method == "linear":
        config = {
            "merge_method": "linear",
            "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
            "parameters": {"normalize": True},
        }
    else:
        config = {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": SCALING}} for m in models],
            "parameters": {"normalize": False},
        }
    config.update(dtype="float32", out_dtype="bfloat16")
    path.write_text(json.dumps(config, indent=2))
    return path


def mergekit_side(venv: Path, config: Path) -> Side:
    yaml = str(venv / "bin" / "mergekit-yaml")
    return Side("mergekit", lambda out: [[yaml, str(config), str(out), "--no-copy-tokenizer"]])


# --- ours -------------------------------------------------------------------------------------


def contmerge(*args: str) -> list[str]:
    return [sys.executable, "-m", "contmerge", *args]


def two_commands(base: Path, state: Path, strategy: str, models: list[Path]) -> Side:
    merge = ["merge", "--quiet", "--base", str(base), "--state", str(state)]
    return Side(
        "contmerge merge + emit",
        lambda out: [
            contmerge(*merge, "--strategy", strategy, *map(str, models)),
            contmerge("emit", "--state", str(state), "--out", str(out)),
        ],
    )


def one_command(base: Path, state: Path, strategy: str, models: list[Path]) -> Side:
    merge = ["merge", "--quiet", "--base", str(base), "--state", str(state)]
    return Side(
        "contmerge merge --out",
        lambda out: [
            contmerge(*merge, "--strategy", strategy, *map(str, models), "--out", str(out))
        ],
    )


def fresh(side: Side, state: Path, template: Path | None = None) -> Side:
    """``side`` starting from no state (or from a copy of ``template``), prepared untimed."""

    def setup() -> None:
        if state.exists():
            shutil.rmtree(state)
        if template is not None:
            shutil.copytree(template, state)

    side.setup = setup
    return side


def prepare_state(
    base: Path, state: Path, strategy: str, models: list[Path], timeout: float
) -> Path:
    if not state.exists():
        merge = ["merge", "--quiet", "--base", str(base), "--state", str(state)]
        timed(contmerge(*merge, "--strategy", strategy, *map(str, models)), timeout, ENV)
    return state


# --- checks and floors ------------------------------------------------------------------------


def max_ulps(ours: Path, theirs: Path, base: Path) -> tuple[float, float]:
    """The largest difference in bf16 ulps, and the share of entries that differ at all. An ulp
    is taken at the magnitude of the inputs (the larger of both outputs and the base entry):
    where a merge cancels to nearly 0, float32 rounding of θ0 + mean(τ) and of mean(θ) differ
    by far more than an ulp of the tiny result but not of the weights merged."""
    worst, differing, total = 0.0, 0, 0
    with open_checkpoint(ours) as a, open_checkpoint(theirs) as b, open_checkpoint(base) as c:
        if set(a.meta) != set(b.meta):
            raise RuntimeError(f"tensor names differ: {sorted(set(a.meta) ^ set(b.meta))[:5]}")
        for name in a.meta:
            x, y, z = a.read(name).float(), b.read(name).float(), c.read(name).float()
            big = torch.maximum(torch.maximum(x.abs(), y.abs()), z.abs())
            # a bf16 ulp at magnitude m: 2^(floor(log2 m) - 7)
            ulp = torch.exp2(torch.floor(torch.log2(big.clamp_min(2.0**-126))) - 7)
            diff = (x - y).abs()
            worst = max(worst, float((diff / ulp).max()))
            differing += int((diff > 0).sum())
            total += diff.numel()
    return worst, differing / max(total, 1)


def read_floor(paths: list[Path]) -> float:
    """Seconds to read every file of ``paths`` once, sequentially."""
    buffer = bytearray(16 << 20)
    started = time.perf_counter()
    for directory in paths:
        for file in sorted(directory.glob("*.safetensors")):
            with open(file, "rb", buffering=0) as handle:
                while handle.readinto(buffer):
                    pass
    return time.perf_counter() - started


def write_floor(where: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` and fsync them."""
    block = os.urandom(16 << 20)
    path = where / "floor.bin"
    started = time.perf_counter()
    with open(path, "wb", buffering=0) as handle:
        left = nbytes
        while left > 0:
            left -= handle.write(block[: min(left, len(block))])
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds


# --- report -----------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _spread(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}"


def report(case: Case, floors: tuple[float, float], ulps: dict[str, tuple[float, float]]) -> None:
    read_s, write_s = floors
    print(
        f"\n{case.title}  (disk floor: read inputs {read_s:.1f} s + write output {write_s:.1f} s)"
    )
    theirs = case.theirs
    t_wall = _median([r.wall for r in theirs.runs]) if theirs else None
    t_rss = _median([r.peak_rss for r in theirs.runs]) if theirs else None
    print(f"  {'':28}{'wall s (median, range)':>26}{'peak RSS':>12}{'wall ×':>9}{'RSS ×':>8}  ulps")
    for side in ([theirs] if theirs else []) + case.ours:
        walls = [r.wall for r in side.runs]
        rss = _median([r.peak_rss for r in side.runs])
        ratio = f"{_median(walls) / t_wall:.2f}" if t_wall and side is not theirs else ""
        rss_ratio = f"{rss / t_rss:.2f}" if t_rss and side is not theirs else ""
        check = ""
        if side.label in ulps:
            worst, share = ulps[side.label]
            check = f"{worst:.2f} ({share:.1e} of entries differ)"
        print(
            f"  {side.label:28}{_median(walls):>12.2f} ({_spread(walls):>11})"
            f"{human(rss):>12}{ratio:>9}{rss_ratio:>8}  {check}"
        )
        per_round = ", ".join(f"{w:.1f}" for w in walls)
        print(f"  {'':28}rounds: {per_round}")


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Side by side with mergekit 0.1.5 on a synthetic LLaMA-architecture bf16 "
        "model: average / task arithmetic of 4, a 5th arriving, 16; whole-process wall time "
        "and peak RSS, alternated rounds, medians, outputs checked equal within bf16 rounding.",
        epilog="Examples: python benchmarks/vs_mergekit.py --quick; "
        "nice -n 10 python benchmarks/vs_mergekit.py --rounds 3",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a 5M-parameter model, 2 rounds, 6 models"
    )
    parser.add_argument("--models", type=int, help="variants written (default 16; --quick 6)")
    parser.add_argument("--rounds", type=int, help="timed rounds per side (default 3; --quick 2)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="mergekit's venv")
    parser.add_argument("--workdir", type=Path, help="where the models go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the models and print where")
    parser.add_argument("--timeout", type=float, default=1800, help="per process (s)")
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=CASE_GROUPS,
        default=list(CASE_GROUPS),
        help="which cases to run (default all): four (4 models, average and task arithmetic), "
        "fifth (a 5th arriving), noop, many (--models in one process, and the last arriving)",
    )
    args = parser.parse_args(argv)
    args.models = args.models or (6 if args.quick else 16)
    args.rounds = args.rounds or (2 if args.quick else 3)
    if args.models < 5:
        parser.error("--models must be at least 5 (the 5th-arrival case)")
    return args


def build_cases(
    work: Path,
    base: Path,
    models: list[Path],
    venv: Path,
    timeout: float,
    model_bytes: int,
    groups: tuple[str, ...] = CASE_GROUPS,
) -> list[Case]:
    """The cases of ``groups``, in this order; only what a chosen case needs is prepared."""
    configs = work / "configs"
    configs.mkdir(exist_ok=True)
    cases: list[Case] = []
    if "four" in groups:
        cases += _four_cases(work, base, models[:4], venv, model_bytes)
    if "fifth" in groups or "noop" in groups:
        template = prepare_state(base, work / "template-4", "average", models[:4], timeout)
        if "fifth" in groups:
            cases.append(_fifth_case(work, base, models[:5], venv, model_bytes, template))
        if "noop" in groups:
            cases.append(_noop_case(base, models[:4], template))
    if "many" in groups:
        cases += _many_cases(work, base, models, venv, timeout, model_bytes)
    return cases


def _four_cases(
    work: Path, base: Path, four: list[Path], venv: Path, model_bytes: int
) -> list[Case]:
    cases = []
    for strategy, method, title in (
        ("average", "linear", "4 models, average (mergekit: linear)"),
        ("task_arithmetic", "task_arithmetic", "4 models, task arithmetic"),
    ):
        state = work / f"state-{strategy}"
        config = mergekit_config(work / "configs" / f"{method}-4.yml", method, four, base)
        cases.append(
            Case(
                title,
                mergekit_side(venv, config),
                [
                    fresh(two_commands(base, state, strategy, four), state),
                    fresh(one_command(base, state, strategy, four), state),
                ],
                (len(four) + (method != "linear")) * model_bytes,
                model_bytes,
            )
        )
    return cases


def _fifth_case(
    work: Path, base: Path, five: list[Path], venv: Path, model_bytes: int, template: Path
) -> Case:
    state = work / "state-5th"
    config = mergekit_config(work / "configs" / "linear-5.yml", "linear", five, base)
    return Case(
        "a 5th arrives, average (mergekit: re-merge 5)",
        mergekit_side(venv, config),
        [
            fresh(two_commands(base, state, "average", five[4:]), state, template),
            fresh(one_command(base, state, "average", five[4:]), state, template),
        ],
        model_bytes,  # ours reads the arrival (and the state, not counted: ours alone)
        model_bytes,
    )


def _noop_case(base: Path, four: list[Path], template: Path) -> Case:
    noop = Side(
        "contmerge merge (no-op)",
        lambda out: [
            contmerge(
                "merge", "--quiet", "--base", str(base), "--state", str(template), *map(str, four)
            )
        ],
    )
    return Case("no-op merge of the 4 already folded", None, [noop], 0, 0)


def _many_cases(
    work: Path, base: Path, models: list[Path], venv: Path, timeout: float, model_bytes: int
) -> list[Case]:
    last = len(models)
    state = work / f"state-{last}"
    config = mergekit_config(work / "configs" / f"linear-{last}.yml", "linear", models, base)
    many = Case(
        f"{last} models, average, one process",
        mergekit_side(venv, config),
        [fresh(one_command(base, state, "average", models), state)],
        last * model_bytes,
        model_bytes,
    )
    template = prepare_state(base, work / f"template-{last - 1}", "average", models[:-1], timeout)
    arriving = Case(
        f"the {last}th arrives (mergekit: re-merge {last})",
        mergekit_side(venv, config),
        [
            fresh(
                one_command(base, work / "state-last", "average", models[-1:]),
                work / "state-last",
                template,
            )
        ],
        model_bytes,
        model_bytes,
    )
    return [many, arriving]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print("[1/4] mergekit's venv")
    try:
        versions = ensure_mergekit(args.venv, args.timeout)
    except TheirFailure as exc:
        print(f"mergekit unavailable ({exc.step}):\n{exc.detail}")
        return 0
    print(f"  {venv_python(args.venv)}: mergekit {versions['mergekit']}, torch {versions['torch']}")
    shape = QUICK_SHAPE if args.quick else LlamaShape()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="contmerge-vs-mergekit-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(
            f"[2/4] base + {args.models} variants, {shape.parameters:,} parameters bf16, 3 shards"
        )
        started = time.perf_counter()
        base = work / "base"
        if not (base / "config.json").exists():
            write_llama(base, shape, 0)
        models = []
        for i in range(1, args.models + 1):
            path = work / f"m{i:02d}"
            if not (path / "config.json").exists():
                write_llama(path, shape, i)
            models.append(path)
        print(f"  {human(shape.nbytes)} each, in {work} ({time.perf_counter() - started:.0f} s)")
        print("[3/4] preparing the states the arrival cases start from (untimed)")
        cases = build_cases(
            work, base, models, args.venv, args.timeout, shape.nbytes, tuple(args.cases)
        )
        print(f"[4/4] {args.rounds} rounds, mergekit and ours alternated")
        outputs = work / "out"
        for round_ in range(args.rounds):
            for n, case in enumerate(cases):
                sides = list(enumerate(([case.theirs] if case.theirs else []) + case.ours))
                for k, side in reversed(sides) if round_ % 2 else sides:
                    run_side(side, outputs / f"case{n}-side{k}", args.timeout)
            print(f"  round {round_ + 1} done")
        read_s = read_floor(models[:4])
        write_s = write_floor(work, shape.nbytes)
        per_model_read = read_s / 4
        for case in cases:
            ulps = {}
            if case.theirs is not None and case.theirs.output is not None:
                for side in case.ours:
                    ulps[side.label] = max_ulps(side.output, case.theirs.output, base)
            floors = (
                per_model_read * case.inputs / shape.nbytes,
                write_s * case.output / shape.nbytes,
            )
            report(case, floors, ulps)
        print(
            "\nulps: max |ours - mergekit| in bf16 ulps at the inputs' magnitude (1: one rounding "
            "apart); "
            f"read floor {shape.nbytes / per_model_read / 1e9:.2f} GB/s, write+fsync floor "
            f"{shape.nbytes / write_s / 1e9:.2f} GB/s; {os.cpu_count()} cores"
        )
    finally:
        if args.keep or args.workdir:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
