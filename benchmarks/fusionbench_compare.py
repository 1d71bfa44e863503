"""Side by side with FusionBench: its OPCM and MagMax vs ours, on the same checkpoints.

What it does, in one run:

1. Creates (or reuses) a separate venv for FusionBench (default
   ``~/.cache/contmerge/fusionbench-venv``): ``pip install torch==2.13.0`` first (so pip keeps
   the CPU build), then ``pip install fusion-bench``.
2. Takes the continual scenario's real checkpoints (``contmerge.simulations``: the MLP backbone
   pretrained, then fine-tuned independently per task; trained once and cached) and copies the
   base and the fine-tuned backbones, byte for byte, into a temp dir in one fixed arrival order
   (the scenario's first order). With ``--size vit-b32`` it writes synthetic checkpoints of a
   ViT-B/32-sized stack instead (12 blocks of q/k/v/out 768×768 and fc1/fc2 768↔3072, with
   biases and LayerNorms: 85M parameters; task vectors of low rank plus noise, seeded).
3. Runs FusionBench's own ``OPCM`` (``fusion_bench.method.opcm.opcm_general``, α) and
   ``MagMaxAlgorithm`` (λ) on those files inside its venv (``_fusionbench_runner.py``), then ours
   (``contmerge.Merger``) on the same files in the same order, in this process. ``--threads N``
   is the cores both sides get: FusionBench as torch's intra-op threads, ours as N layers folded
   at once (``per_tensor_parallel``) with one torch thread each.
4. Prints, per method, the max |difference| of the merged weights (overall, linear weights,
   other tensors), absolute and relative to the size of the merged update, with FusionBench's
   own float32-vs-float64 difference as the tolerance; the fold times (ours / theirs, per fold
   and in total) and, for OPCM, each side's split of a fold: SVD (ours: the float64 Gram
   eigendecomposition), the matrix products around it, reading the checkpoint, the rest.

If FusionBench cannot be installed or run, it prints the failing step and the error and exits 0
(that is not a bug of ours); it exits non-zero only when our side fails.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _venv
import safetensors.torch
import torch
from _venv import TheirFailure, tail, venv_python
from torch import nn

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "_fusionbench_runner.py"
DEFAULT_VENV = Path(
    os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "contmerge", "fusionbench-venv"
)
FUSION_BENCH = "fusion-bench"
# fusion-bench 0.2.33 requires an unpinned transformers, but importing its OPCM package pulls in
# its CLIP task pool, which imports transformers' CLIPVisionTransformer: gone in transformers 5
# (ImportError). Its algorithm code itself does not use transformers.
TRANSFORMERS_PIN = "transformers<5"
# what must import for the comparison: the two algorithm modules, not just the package
PROBE_IMPORTS = "fusion_bench.method.opcm.opcm_general, fusion_bench.method.magmax"
QUICK_MODELS = 4  # 1 initial + 3 projected folds: still exercises OPCM's SVD path
SIZES = ("scenario", "vit-b32")
# FusionBench's SVDs run on torch's OpenMP team. Spinning team members wait for a descheduled
# one at each of LAPACK's many small parallel regions: on this 2-core machine at load 7-10 a
# 768x768 SVD took 12-21 s on 2 threads against 1.3 s on 1 (and 1.2-1.6 s on 2 threads with
# passive waiting). Ours folds on 1 torch thread per layer, so no team waits on our side.
TEAM_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# no hub, no telemetry: the runner must work offline (and say so if it does not)
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}


def ensure_venv(venv: Path, timeout: float) -> dict[str, str]:
    """Reuse the venv when FusionBench imports there; otherwise create it and install."""
    code = (
        f"import json, importlib.metadata as m, torch, {PROBE_IMPORTS};"
        "print(json.dumps({'torch': torch.__version__, 'fusion_bench': m.version('fusion-bench'),"
        " 'transformers': m.version('transformers')}))"
    )
    return _venv.ensure_venv(
        venv, "FusionBench", [FUSION_BENCH, TRANSFORMERS_PIN], code, OFFLINE_ENV, timeout
    )


# --------------------------------------------------------------------------------------------
# Our checkpoints


@dataclass
class Exported:
    base: Path
    models: list[tuple[str, Path]]  # (task name, path) in arrival order
    linear_names: list[str]


def backbone_layout(module: nn.Module) -> tuple[dict[str, Any], list[str]]:
    """Leaf modules with constructor arguments (for the runner) and the linear weight names."""
    leaves: list[dict[str, Any]] = []
    linear: list[str] = []
    owned: set[str] = set()
    for name, sub in module.named_modules():
        if list(sub.children()) or not list(sub.parameters(recurse=False)):
            continue
        owned.update(f"{name}.{p}" for p, _ in sub.named_parameters(recurse=False))
        if isinstance(sub, nn.Linear):
            kwargs = {
                "in_features": sub.in_features,
                "out_features": sub.out_features,
                "bias": sub.bias is not None,
            }
            leaves.append({"name": name, "type": "Linear", "kwargs": kwargs})
            linear.append(f"{name}.weight")
        elif isinstance(sub, nn.LayerNorm):
            kwargs = {
                "normalized_shape": list(sub.normalized_shape),
                "eps": sub.eps,
                "elementwise_affine": sub.elementwise_affine,
            }
            leaves.append({"name": name, "type": "LayerNorm", "kwargs": kwargs})
        elif isinstance(sub, nn.Embedding):
            kwargs = {"num_embeddings": sub.num_embeddings, "embedding_dim": sub.embedding_dim}
            leaves.append({"name": name, "type": "Embedding", "kwargs": kwargs})
        else:
            raise ValueError(f"backbone leaf {name} is a {type(sub).__name__}: not supported")
    direct = {n: list(p.shape) for n, p in module.named_parameters() if n not in owned}
    if any(True for _ in module.buffers()):
        raise ValueError("the backbone has buffers; the runner's layout does not carry them")
    return {"leaves": leaves, "direct_params": direct}, linear


def scenario_checkpoints(full: bool, cache_dir: str | None, order_seed: int) -> tuple[Any, ...]:
    """(base path, [(task, path)] in the scenario's first arrival order, description)."""
    from contmerge.simulations.continual import ContinualConfig, default_cache_dir, make_orders
    from contmerge.simulations.data import load_suite
    from contmerge.simulations.models import ModelConfig
    from contmerge.simulations.train import CheckpointCache

    config = ContinualConfig(quick=not full, order_seed=order_seed, progress=False)
    data_cfg, train_cfg = config.data_config(), config.train_config()
    suite = load_suite(data_cfg)
    cache = CheckpointCache(
        suite,
        data_cfg,
        ModelConfig(),
        train_cfg,
        Path(cache_dir) if cache_dir else default_cache_dir(),
        progress=False,
    )
    ckpts = cache.prepare(sequential=False)  # trains only what is not cached yet
    order = make_orders(suite.names, 1, order_seed)[0]
    desc = (
        f"continual scenario ({'full' if full else 'demo'} training config, {suite.sources}), "
        f"independent fine-tuning, cache {ckpts.root}"
    )
    return ckpts.pretrained, [(n, ckpts.independent[n]) for n in order], desc


def export_checkpoints(
    out: Path, base: Path, models: list[tuple[str, Path]], linear: list[str], float64: bool
) -> Exported:
    """Copy the files byte for byte, or cast them to float64 (the reference runs)."""
    out.mkdir(parents=True)

    def put(src: Path, name: str) -> Path:
        dst = out / f"{name}.safetensors"
        if float64:
            state = safetensors.torch.load_file(str(src))
            safetensors.torch.save_file({k: v.double() for k, v in state.items()}, str(dst))
        else:
            shutil.copyfile(src, dst)
        return dst

    exported = [(task, put(path, f"{i:02d}_{task}")) for i, (task, path) in enumerate(models, 1)]
    return Exported(put(base, "00_base"), exported, linear)


def vit_b32_stack(blocks: int = 12, width: int = 768, hidden: int = 3072) -> nn.Module:
    """The linear layers, biases and LayerNorms of ViT-B/32's transformer (no patch embedding,
    no head), on the meta device: only its layout is needed."""
    with torch.device("meta"):
        root = nn.Module()
        root.blocks = nn.ModuleList()
        for _ in range(blocks):
            block = nn.Module()
            block.ln_1 = nn.LayerNorm(width)
            block.attn = nn.ModuleDict(
                {p: nn.Linear(width, width) for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
            )
            block.ln_2 = nn.LayerNorm(width)
            block.mlp = nn.ModuleDict(
                {"fc1": nn.Linear(width, hidden), "fc2": nn.Linear(hidden, width)}
            )
            root.blocks.append(block)
    return root


def _generator(*parts: object) -> torch.Generator:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _synthetic_tensor(name: str, shape: tuple[int, ...], model: int, seed: int) -> torch.Tensor:
    """The base (model 0): ViT-like scales; arrival t: base + a task vector of rank 8 plus
    noise (fine-tuned deltas are far from random: a few directions dominate)."""
    gen = _generator(seed, name)
    if name.endswith("ln_1.weight") or name.endswith("ln_2.weight"):
        base = 1 + 0.05 * torch.randn(shape, generator=gen)
    else:
        base = 0.02 * torch.randn(shape, generator=gen)
    if model == 0:
        return base
    gen = _generator(seed, model, name)
    noise = 3e-4 * torch.randn(shape, generator=gen)
    if len(shape) == 2:
        rank = 8
        left = torch.randn(shape[0], rank, generator=gen)
        right = torch.randn(rank, shape[1], generator=gen)
        return base + noise + 2e-4 * (left @ right)
    return base + noise


def vit_b32_checkpoints(out: Path, models: int, seed: int) -> tuple[Exported, dict[str, Any]]:
    """Base and ``models`` arrivals of the ViT-B/32-sized stack as float32 safetensors files."""
    module = vit_b32_stack()
    layout, linear = backbone_layout(module)
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    out.mkdir(parents=True)

    def put(model: int, name: str) -> Path:
        path = out / f"{name}.safetensors"
        state = {n: _synthetic_tensor(n, s, model, seed) for n, s in shapes.items()}
        safetensors.torch.save_file(state, str(path))
        return path

    base = put(0, "00_base")
    arrivals = [(f"task{t}", put(t, f"{t:02d}_task{t}")) for t in range(1, models + 1)]
    return Exported(base, arrivals, linear), layout


# --------------------------------------------------------------------------------------------
# The two sides


@dataclass
class SideResult:
    merged: dict[str, torch.Tensor]
    folds: list[float]  # seconds per fold, the fastest of the repeats
    other_seconds: float  # ours: the emit; theirs: the whole run()
    #: per fold, seconds by kind of work (total, svd, matmul, io, other), of the fastest repeat
    splits: list[dict[str, float]] | None = None
    #: every round's seconds per fold (``fastest``), for the spread
    rounds: list[list[float]] | None = None


def run_theirs(
    python: Path,
    runs: list[tuple[str, Exported, int]],
    args: argparse.Namespace,
    layout: dict[str, Any],
    workdir: Path,
    threads: int | None = None,
) -> list[SideResult]:
    """All of FusionBench's runs in one subprocess (its imports take ~20 s), on ``threads``
    torch threads (default ``--threads``)."""
    threads = threads or args.threads
    job = {
        "threads": threads,
        "alpha": args.alpha,
        "scaling_factor": args.scaling_factor,
        "layout": layout,
        "report": str(workdir / "theirs_report.json"),
        "runs": [
            {
                "method": method,
                "base": str(ex.base),
                "models": [[f"m{i:02d}_{n}", str(p)] for i, (n, p) in enumerate(ex.models, 1)],
                "repeat": repeat,
                "out": str(workdir / f"theirs_{k}_{method}.safetensors"),
            }
            for k, (method, ex, repeat) in enumerate(runs)
        ],
    }
    job_path = workdir / "theirs_job.json"
    job_path.write_text(json.dumps(job, indent=2))
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        **TEAM_ENV,
        "CUDA_VISIBLE_DEVICES": "",  # CPU only, as ours
    }
    step = "run FusionBench's OPCM/MagMax in its venv"
    try:
        proc = subprocess.run(
            [str(python), str(RUNNER), str(job_path)],
            capture_output=True,
            text=True,
            timeout=args.timeout,
            env=env,
            cwd=workdir,  # anything it writes (outputs/, lightning_logs/) lands in the temp dir
        )
    except subprocess.TimeoutExpired as exc:
        raise TheirFailure(step, f"timed out after {args.timeout:.0f} s") from exc
    report_path = Path(job["report"])
    if not report_path.exists():
        raise TheirFailure(
            f"{step} (the runner died before reporting)",
            f"exit code {proc.returncode}\n{tail(proc.stderr or proc.stdout)}",
        )
    report = json.loads(report_path.read_text())
    if not report["ok"]:
        raise TheirFailure(report["step"], f"{report['error']}\n{tail(report['trace'], 15)}")
    return [
        SideResult(
            safetensors.torch.load_file(r["out"]),
            r["folds"],
            r["run_seconds"],
            r["splits"] if r["method"] == "opcm" else None,
        )
        for r in report["runs"]
    ]


class _Clock:
    """Seconds spent in a few functions of ours, summed over every thread that calls them."""

    def __init__(self) -> None:
        self.spent = {"svd": 0.0, "matmul": 0.0, "io": 0.0}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def installed(self) -> Any:
        from contmerge.fold_run import FoldRun
        from contmerge.strategies import opcm

        patched = [
            (opcm, "singular_basis", "svd"),
            (opcm, "remove_projection", "matmul"),
            (FoldRun, "_delta", "io"),  # reads the arrival's tensor and the base's, forms δ
        ]
        originals = [getattr(owner, attr) for owner, attr, _ in patched]
        for (owner, attr, key), func in zip(patched, originals):
            setattr(owner, attr, self._timed(key, func))
        try:
            yield self
        finally:
            for (owner, attr, _), func in zip(patched, originals):
                setattr(owner, attr, func)

    def _timed(self, key: str, func: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                with self._lock:
                    self.spent[key] += time.perf_counter() - started

        return wrapper

    def split(self, total: float, before: dict[str, float]) -> dict[str, float]:
        spent = {k: v - before[k] for k, v in self.spent.items()}
        return {"total": total, **spent, "other": total - sum(spent.values())}


def fastest(rounds: list[SideResult]) -> SideResult:
    """Per fold, the fastest round (with its split), and every round's folds for the spread."""
    picks = [min(rounds, key=lambda r: r.folds[i]) for i in range(len(rounds[0].folds))]
    return SideResult(
        rounds[-1].merged,
        [r.folds[i] for i, r in enumerate(picks)],
        min(r.other_seconds for r in rounds),
        [r.splits[i] for i, r in enumerate(picks)] if rounds[0].splits else None,
        [r.folds for r in rounds],
    )


def run_ours(ex: Exported, method: str, args: argparse.Namespace, repeat: int) -> SideResult:
    from contmerge import Merger

    hparams = {"alpha": args.alpha} if method == "opcm" else {"scaling_factor": args.scaling_factor}
    # the exact nn.Linear weights, as FusionBench's isinstance check sees them
    linear = "^(" + "|".join(re.escape(n) for n in ex.linear_names) + ")$"
    repeats: list[list[float]] = []
    split_repeats: list[list[dict[str, float]]] = []
    emits: list[float] = []
    merged: dict[str, torch.Tensor] = {}
    clock = _Clock()
    with clock.installed():
        for _ in range(max(1, repeat)):
            folds: list[float] = []
            splits: list[dict[str, float]] = []
            with Merger(
                str(ex.base), method, None, linear=linear, workers=args.threads, settings=hparams
            ) as merger:
                for _, path in ex.models:
                    before = dict(clock.spent)
                    started = time.perf_counter()
                    merger.fold(str(path))
                    folds.append(time.perf_counter() - started)
                    splits.append(clock.split(folds[-1], before))
                started = time.perf_counter()
                merged = merger.emit_state_dict()
                emits.append(time.perf_counter() - started)
            repeats.append(folds)
            split_repeats.append(splits)
    # per fold, the fastest repeat, as on FusionBench's side
    fastest = [min(range(len(repeats)), key=lambda r: repeats[r][i]) for i in range(len(ex.models))]
    return SideResult(
        merged,
        [repeats[r][i] for i, r in enumerate(fastest)],
        min(emits),
        [split_repeats[r][i] for i, r in enumerate(fastest)] if method == "opcm" else None,
    )


def sensitivity(ex64: Exported, method: str, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Ours in float64 on the checkpoints with every entry moved by ~1 float32 ulp (seeded).

    How far that moves the result is the spread any float32 implementation must expect: a gap
    between two float32 implementations below it is not an algorithmic difference.
    """
    from contmerge import Merger

    hparams = {"alpha": args.alpha} if method == "opcm" else {"scaling_factor": args.scaling_factor}
    linear = "^(" + "|".join(re.escape(n) for n in ex64.linear_names) + ")$"
    gen = torch.Generator().manual_seed(0)
    ulp = torch.finfo(torch.float32).eps / 2

    def nudged(path: Path) -> dict[str, torch.Tensor]:
        state = safetensors.torch.load_file(str(path))
        return {
            k: v * (1 + ulp * torch.randn(v.shape, generator=gen, dtype=v.dtype))
            for k, v in state.items()
        }

    with Merger(str(ex64.base), method, None, linear=linear, settings=hparams) as merger:
        for _, path in ex64.models:
            merger.fold(nudged(path))
        return merger.emit_state_dict()


# --------------------------------------------------------------------------------------------
# Comparison

KINDS = ("all", "linear weights", "others")


def max_abs_diff(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], linear: set[str]
) -> dict[str, float]:
    """max |a − b| overall, over the nn.Linear weights, and over every other tensor."""
    if set(a) != set(b):
        raise AssertionError(f"different tensor names: {sorted(set(a) ^ set(b))}")
    per = {n: float((a[n].double() - b[n].double()).abs().max()) for n in a}
    return {
        "all": max(per.values()),
        "linear weights": max((v for n, v in per.items() if n in linear), default=0.0),
        "others": max((v for n, v in per.items() if n not in linear), default=0.0),
    }


def update_scale(
    merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor], linear: set[str]
) -> dict[str, float]:
    """max |merged − base| per kind: the size a difference should be judged against."""
    zero = {n: torch.zeros_like(v) for n, v in base.items()}
    delta = {n: merged[n].double() - base[n].double() for n in base}
    return max_abs_diff(delta, zero, linear)


def relative(diff: dict[str, float], scale: dict[str, float]) -> dict[str, float]:
    """A difference per kind over the size of the merged update of that kind."""
    return {k: diff[k] / scale[k] if scale[k] > 0 else 0.0 for k in KINDS}


def _row(label: str, values: dict[str, float], fmt: str = "{:>16.3e}") -> str:
    return f"  {label:<38}" + "".join(fmt.format(values[k]) for k in KINDS)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:6.2f}x" if b > 0 else "   n/a"


@dataclass
class MethodResult:
    ours: SideResult
    theirs: SideResult
    ours64: SideResult | None
    theirs64: SideResult | None
    nudged64: dict[str, torch.Tensor] | None
    #: FusionBench's float32 run on ``--self-threads`` threads: its own float32 spread
    theirs_other: SideResult | None = None


def report_method(
    method: str, res: MethodResult, ex: Exported, base: dict[str, torch.Tensor]
) -> None:
    linear = set(ex.linear_names)
    print(f"\n== {'OPCM' if method == 'opcm' else 'MagMax'} ==")
    print(f"  {'merged weights':<38}" + "".join(f"{k:>16}" for k in KINDS))
    gap = max_abs_diff(res.ours.merged, res.theirs.merged, linear)
    print(_row("max |ours − FusionBench|", gap))
    scale = update_scale(res.theirs.merged, base, linear)
    print(_row("  (scale: max |merged − base|)", scale, "{:>16.3g}"))
    print(_row("  relative (÷ scale)", relative(gap, scale)))
    verdicts = []
    if res.theirs_other is not None:
        # MKL's SVD rounds differently on another thread count: FusionBench against itself
        own = max_abs_diff(res.theirs_other.merged, res.theirs.merged, linear)
        print(_row("FusionBench vs itself, other threads", own))
        own_rel, rel_gap = relative(own, scale)["all"], relative(gap, scale)["all"]
        verdicts.append(
            f"relative to the update: ours vs FusionBench {rel_gap:.2e}, FusionBench float32 vs "
            f"itself on another thread count {own_rel:.2e}: "
            f"{'within' if rel_gap <= own_rel else 'ABOVE'}"
        )
    if res.ours64 is not None and res.theirs64 is not None:
        agree = max_abs_diff(res.ours64.merged, res.theirs64.merged, linear)
        print(_row("same, both in float64", agree))
        ref = res.theirs64.merged  # FusionBench's own code in float64: a neutral reference
        ours_err = max_abs_diff(res.ours.merged, ref, linear)
        theirs_err = max_abs_diff(res.theirs.merged, ref, linear)
        print(_row("max |ours − float64 result|", ours_err))
        print(_row("max |FusionBench − float64 result|", theirs_err))
        if res.nudged64 is not None:
            # the method's own sensitivity to float32-sized changes of its inputs
            spread = max_abs_diff(res.nudged64, ref, linear)
            print(_row("float64, inputs moved by ~1 f32 ulp", spread))
        same = agree["all"] <= 1e-9 * max(scale["all"], 1e-30)
        verdicts.append(
            "same algorithm (they agree in float64); the float32 gap is float32 rounding, "
            "as amplified by the method (see each side's distance to the float64 result)"
            if same
            else "THE ALGORITHMS DIFFER: they disagree in float64 too"
        )
        # the tolerance: how far FusionBench's own float32 run is from its float64 run
        tol = relative(theirs_err, scale)["all"]
        rel_gap = relative(gap, scale)["all"]
        rel_ours = relative(ours_err, scale)["all"]
        verdicts.append(
            f"relative to the update: ours vs FusionBench {rel_gap:.2e}, tolerance (FusionBench "
            f"float32 vs its float64) {tol:.2e}: {'within' if rel_gap <= tol else 'ABOVE'}; "
            f"ours vs float64 {rel_ours:.2e} ({'at least as' if rel_ours <= tol else 'LESS'} "
            "exact as FusionBench)"
        )
    for verdict in verdicts:
        print(f"  verdict: {verdict}")
    print("  fold times (s), fastest of the repeats:")
    for i, ((name, _), a, b) in enumerate(zip(ex.models, res.ours.folds, res.theirs.folds), 1):
        print(
            f"    fold {i:2d} {name:<18} ours {a:8.4f}  FusionBench {b:8.4f}  "
            f"ours/theirs {_ratio(a, b)}  theirs/ours {_ratio(b, a)}"
        )
    ta, tb = sum(res.ours.folds), sum(res.theirs.folds)
    print(
        f"    total{'':<21} ours {ta:8.4f}  FusionBench {tb:8.4f}  ours/theirs {_ratio(ta, tb)}  "
        f"theirs/ours {_ratio(tb, ta)}"
    )
    if len(ex.models) > 1:
        pa, pb = sum(res.ours.folds[1:]), sum(res.theirs.folds[1:])
        n = len(ex.models) - 1
        print(
            f"    folds 2..{len(ex.models)}{' (projected)' if method == 'opcm' else ''}, mean "
            f"per fold: ours {pa / n:.4f} s, "
            f"FusionBench {pb / n:.4f} s: FusionBench/ours {_ratio(pb, pa)}"
        )
        if res.ours.rounds and res.theirs.rounds and len(res.ours.rounds) > 1:
            # each round's own ratio (theirs and ours of one round ran one after the other)
            ratios = [sum(b[1:]) / sum(a[1:]) for a, b in zip(res.ours.rounds, res.theirs.rounds)]
            print(
                f"    per round, FusionBench/ours over folds 2..{len(ex.models)}: "
                + ", ".join(f"{r:.2f}x" for r in ratios)
                + f" (spread {min(ratios):.2f}–{max(ratios):.2f}x)"
            )
    print(
        f"    (not in the folds: our emit of the merged model {res.ours.other_seconds:.4f} s; "
        f"FusionBench's whole run() {res.theirs.other_seconds:.4f} s)"
    )
    if res.ours.splits and res.theirs.splits:
        report_split(ex, res.ours.splits, res.theirs.splits)


SPLIT_KINDS = ("svd", "matmul", "io", "other")


def report_split(
    ex: Exported, ours: list[dict[str, float]], theirs: list[dict[str, float]]
) -> None:
    """Each fold's seconds by kind of work. With several threads, ours are thread-seconds (they
    add up to more than the fold's wall time; "other" is then the wall time left over)."""
    print(
        "  split of each fold (s): svd = SVD (ours: float64 Gram eigendecomposition and U); "
        "matmul = the products"
    )
    print(
        "  around it; io = reading the checkpoint (ours: each tensor and the base's, and δ; "
        "theirs: the file"
    )
    print(
        "  and building the module); other = the rest (norms, sums, hashing, state); ours are "
        "thread-seconds"
    )
    head = "".join(f"{k:>8}" for k in SPLIT_KINDS)
    print(f"    {'':<24}ours:{head}    | FusionBench:{head}")
    for i, ((name, _), a, b) in enumerate(zip(ex.models, ours, theirs), 1):
        cells_a = "".join(f"{a[k]:8.2f}" for k in SPLIT_KINDS)
        cells_b = "".join(f"{b[k]:8.2f}" for k in SPLIT_KINDS)
        print(f"    fold {i:2d} {name:<18}     {cells_a}    |             {cells_b}")


# --------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Examples: python benchmarks/fusionbench_compare.py --quick; "
        "python benchmarks/fusionbench_compare.py --size vit-b32 --threads 2",
    )
    parser.add_argument(
        "--size",
        choices=SIZES,
        default="scenario",
        help="scenario: the continual scenario's trained MLP checkpoints (default); vit-b32: "
        "synthetic checkpoints of a ViT-B/32-sized stack (85M parameters), OPCM only unless "
        "--methods says otherwise, 4 arrivals, 1 repeat, no input-sensitivity run",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the vit-b32 checkpoints")
    parser.add_argument(
        "--venv",
        type=Path,
        default=DEFAULT_VENV,
        help=f"FusionBench's venv, created if needed (default {DEFAULT_VENV})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"only the first {QUICK_MODELS} checkpoints of the order "
        "(< 2 min once the venv exists and the checkpoints are cached)",
    )
    parser.add_argument("--models", type=int, default=None, help="use the first N checkpoints")
    parser.add_argument("--alpha", type=float, default=0.5, help="OPCM's α (default 0.5)")
    parser.add_argument(
        "--scaling-factor", type=float, default=0.5, help="MagMax's λ (default 0.5)"
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of opcm,magmax (default: both; vit-b32: opcm)",
    )
    parser.add_argument(
        "--full-training",
        action="store_true",
        help="the scenario's full training config (default: the demo's, usually cached)",
    )
    parser.add_argument("--cache-dir", default=None, help="the scenario's checkpoint cache")
    parser.add_argument("--order-seed", type=int, default=42, help="the scenario's order seed")
    parser.add_argument(
        "--no-float64",
        action="store_true",
        help="skip the float64 runs of both sides (on float64 casts of the same checkpoints) "
        "that tell an algorithmic difference from float32 rounding",
    )
    parser.add_argument(
        "--self-threads",
        type=int,
        default=None,
        help="also run FusionBench's float32 on this many threads: how far it is from itself "
        "(MKL's SVD rounds differently per thread count); with --no-float64, the cheap tolerance",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="cores for each side: FusionBench's torch threads; ours: layers folded at once",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="timed runs per side; per fold the fastest counts (default 3; vit-b32: 1)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="per subprocess (s; default 1800, vit-b32: 14400)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and print it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    vit = args.size == "vit-b32"
    if args.methods is None:
        args.methods = "opcm" if vit else "opcm,magmax"
    if args.repeat is None:
        args.repeat = 1 if vit else 3
    if args.timeout is None:
        args.timeout = 14400.0 if vit else 1800.0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in ("opcm", "magmax") for m in methods):
        print(f"--methods must be a subset of opcm,magmax, got {args.methods!r}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(f"FusionBench side by side: {', '.join(methods)}; threads={args.threads}")

    print("[1/4] FusionBench's venv")
    try:
        versions = ensure_venv(args.venv, args.timeout)
    except TheirFailure as exc:
        return _unavailable(exc)
    print(
        f"  {args.venv}: fusion-bench {versions['fusion_bench']}, torch {versions['torch']}, "
        f"transformers {versions['transformers']}"
    )

    workdir = Path(tempfile.mkdtemp(prefix="contmerge-fusionbench-"))
    try:
        if vit:
            print("[2/4] synthetic checkpoints of a ViT-B/32-sized stack")
            ex, layout = vit_b32_checkpoints(
                workdir / "float32", args.models or QUICK_MODELS, args.seed
            )
            linear = ex.linear_names
            desc = f"ViT-B/32-sized stack, seed {args.seed}, written to {workdir}"
        else:
            print("[2/4] our checkpoints (trained and cached first if missing: a few minutes)")
            base_path, models, desc = scenario_checkpoints(
                args.full_training, args.cache_dir, args.order_seed
            )
            models = models[: args.models or (QUICK_MODELS if args.quick else len(models))]
            from contmerge.simulations.models import Backbone

            layout, linear = backbone_layout(Backbone())
            ex = export_checkpoints(workdir / "float32", base_path, models, linear, False)
            desc += f"; base + {len(ex.models)} fine-tuned backbones, byte-identical copies"
        ex64 = (
            None
            if args.no_float64
            else export_checkpoints(workdir / "float64", ex.base, ex.models, linear, True)
        )
        base = safetensors.torch.load_file(str(ex.base))
        print(f"  {desc}")
        print(f"  arrival order: {' -> '.join(n for n, _ in ex.models)}")
        names = ", ".join(linear) if len(linear) <= 8 else f"{len(linear)} of them"
        print(
            f"  {len(base)} tensors ({', '.join(sorted({str(v.dtype) for v in base.values()}))}), "
            f"{sum(v.numel() for v in base.values()):,} parameters; nn.Linear weights: {names}"
        )

        # the timed float32 runs alternate, theirs then ours, so that both sides see the same
        # load on a shared machine; the float64 reference runs come after
        print(
            f"[3/4] {args.repeat} round(s), each FusionBench (in its venv) then ours: "
            f"{', '.join(methods)}"
        )
        python = venv_python(args.venv)
        theirs_rounds: list[list[SideResult]] = []
        ours_rounds: dict[str, list[SideResult]] = {m: [] for m in methods}
        for round_ in range(1, args.repeat + 1):
            try:
                theirs_rounds.append(
                    run_theirs(python, [(m, ex, 1) for m in methods], args, layout, workdir)
                )
            except TheirFailure as exc:
                return _unavailable(exc)
            for i, method in enumerate(methods):
                ours_rounds[method].append(run_ours(ex, method, args, 1))
                # as soon as known: a long run stopped later still leaves its figures
                theirs_folds = " ".join(f"{t:.2f}" for t in theirs_rounds[-1][i].folds)
                ours_folds = " ".join(f"{t:.2f}" for t in ours_rounds[method][-1].folds)
                print(
                    f"  round {round_}, {method}: folds (s) FusionBench {theirs_folds}; ours "
                    f"{ours_folds}",
                    flush=True,
                )
        print("[4/4] float64 reference runs, FusionBench then ours" if ex64 else "[4/4] -")
        theirs_other: list[SideResult | None] = [None] * len(methods)
        if args.self_threads:
            print(f"  FusionBench's float32 again on {args.self_threads} thread(s): its own spread")
            try:
                theirs_other = list(
                    run_theirs(
                        python,
                        [(m, ex, 1) for m in methods],
                        args,
                        layout,
                        workdir,
                        args.self_threads,
                    )
                )
            except TheirFailure as exc:
                return _unavailable(exc)
        theirs64: list[SideResult | None] = [None] * len(methods)
        if ex64 is not None:
            try:
                theirs64 = list(
                    run_theirs(python, [(m, ex64, 1) for m in methods], args, layout, workdir)
                )
            except TheirFailure as exc:
                return _unavailable(exc)
        results: dict[str, MethodResult] = {}
        for i, method in enumerate(methods):
            results[method] = MethodResult(
                ours=fastest(ours_rounds[method]),
                theirs=fastest([r[i] for r in theirs_rounds]),
                ours64=None if ex64 is None else run_ours(ex64, method, args, 1),
                theirs64=theirs64[i],
                nudged64=None if ex64 is None or vit else sensitivity(ex64, method, args),
                theirs_other=theirs_other[i],
            )

        print(f"\nFusionBench {versions['fusion_bench']} (torch {versions['torch']}) vs contmerge")
        print(f"  α = {args.alpha} (OPCM), λ = {args.scaling_factor} (MagMax); fold times are")
        print(f"  the fastest of {args.repeat} round(s), each fold from reading the file to done")
        for method, res in results.items():
            report_method(method, res, ex, base)
    finally:
        if args.keep:
            print(f"\n(kept {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _unavailable(exc: TheirFailure) -> int:
    print("\nFusionBench comparison NOT RUN: FusionBench could not be installed or run here.")
    print(f"  failing step: {exc.step}")
    print("  error:")
    for line in exc.detail.splitlines():
        print(f"    {line}")
    return 0  # not a bug of ours: said precisely, exit 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except SystemExit:
        raise
    except BaseException:  # our own bug: loud, non-zero
        traceback.print_exc()
        raise SystemExit(1) from None
