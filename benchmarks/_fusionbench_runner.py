"""Run FusionBench's OPCM and MagMax on exported checkpoints; executed inside FusionBench's venv.

Standalone on purpose: it imports only the standard library, torch, safetensors and fusion_bench
(contmerge is not installed in that venv). ``benchmarks/fusionbench_compare.py`` writes a job
file; this script rebuilds plain ``nn.Module``s from the backbone's layout, drives FusionBench's
own algorithm classes on them through a ``BaseModelPool`` (no hub, no task pool, CPU fabric
without loggers, no saving, our arrival order), and writes each merged state dict and the fold
timings. All runs share one process, so FusionBench's slow imports are paid once.

Each fold's time is split (OPCM): seconds in its ``svd`` helper, in the rest of
``merge_linear_weights`` (the matrix products around the SVD), and in loading the model
(reading the file and building the module); the remainder is its norms and other parameters.

Job (JSON): {"threads": int, "alpha": float, "scaling_factor": float, "layout": {...},
"report": path, "runs": [{"method": "opcm"|"magmax", "base": path,
"models": [[name, path], ...], "repeat": int, "out": path}, ...]}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

STEP = "start"  # the step that failed, reported to the caller with the traceback


def build_module(layout: dict[str, Any]) -> Any:
    """A module tree with the same leaf classes and parameter names as our backbone.

    OPCM's code dispatches on the leaf class (``isinstance(module, nn.Linear)``), so the leaves
    must be real ``nn.Linear``/``nn.LayerNorm``/``nn.Embedding``; containers are plain modules.
    """
    import torch
    from torch import nn

    root = nn.Module()

    def container(path: str) -> nn.Module:
        node = root
        for part in [p for p in path.split(".") if p]:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        return node

    for leaf in layout["leaves"]:
        kind, kwargs = leaf["type"], leaf["kwargs"]
        if kind == "Linear":
            module: nn.Module = nn.Linear(**kwargs)
        elif kind == "LayerNorm":
            module = nn.LayerNorm(**kwargs)
        elif kind == "Embedding":
            module = nn.Embedding(**kwargs)
        else:
            raise ValueError(f"layout has a leaf of unsupported type {kind!r}")
        parent, _, attr = leaf["name"].rpartition(".")
        container(parent).add_module(attr, module)
    for name, shape in layout.get("direct_params", {}).items():
        # a parameter held by a non-leaf module (FusionBench's OPCM never merges those)
        parent, _, attr = name.rpartition(".")
        container(parent).register_parameter(attr, nn.Parameter(torch.empty(shape)))
    return root


def run_all(job: dict[str, Any], report: dict[str, Any]) -> None:
    global STEP
    STEP = "import torch / safetensors / lightning / fusion_bench"
    import importlib.metadata as md

    import lightning as L
    import safetensors.torch
    import torch
    from fusion_bench import BaseModelPool

    torch.set_num_threads(int(job["threads"]))
    report["versions"] = {
        "fusion_bench": md.version("fusion-bench"),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    STEP = "build the backbone module from the layout"
    build_module(job["layout"])  # fail early on an unsupported layout

    events: list[tuple[str, float, dict[str, float]]] = []  # ("load" | "next", time, clock)
    clock = {"svd": 0.0, "linear": 0.0, "load": 0.0}  # seconds spent in each, cumulative

    def timed(key: str, func: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                clock[key] += time.perf_counter() - started

        return wrapper

    def mark(kind: str) -> None:
        events.append((kind, time.perf_counter(), dict(clock)))

    class TimedList(list):
        """Records when the algorithm's loop advances: a fold ends when the next one begins."""

        def __iter__(self):  # type: ignore[no-untyped-def]
            for item in list.__iter__(self):
                mark("next")
                yield item
            mark("next")

        def __getitem__(self, key):  # type: ignore[no-untyped-def]
            got = list.__getitem__(self, key)
            return TimedList(got) if isinstance(key, slice) else got  # OPCM slices [1:]

    class SafetensorsPool(BaseModelPool):
        """Models are safetensors paths; loading builds the module and reads the file, inside
        the timed fold, as ``Merger.fold(path)`` reads it on our side."""

        def load_model(self, model_name_or_config: Any, *args: Any, **kwargs: Any) -> Any:
            name = str(model_name_or_config)
            if name != "_pretrained_":
                mark("load")
            started = time.perf_counter()
            state = safetensors.torch.load_file(str(self._models[name]))
            # in the checkpoints' dtype: load_state_dict would cast into float32 params
            dtype = next(v.dtype for v in state.values() if v.is_floating_point())
            module = build_module(job["layout"]).to(dtype)
            module.load_state_dict(state, strict=True)
            clock["load"] += time.perf_counter() - started
            return module

        @property
        def model_names(self) -> list[str]:
            return TimedList(super().model_names)

    instrumented: set[str] = set()

    def make_algo(method: str) -> Any:
        if method == "opcm":
            import fusion_bench.method.opcm.opcm_general as opcm_general
            from fusion_bench.method.opcm.opcm_general import OPCM

            if "opcm" not in instrumented:  # its module-level ``svd`` and the per-layer merge
                opcm_general.svd = timed("svd", opcm_general.svd)
                OPCM.merge_linear_weights = timed("linear", OPCM.merge_linear_weights)
                instrumented.add("opcm")

            algo = OPCM(
                alpha=float(job["alpha"]),
                shuffle_order=False,  # our fixed arrival order, not its random.shuffle
                seed=None,
                save_on_every_step=False,
                evaluate_on_every_step=False,
                num_ray_actors=0,
            )
            # CPU fabric without loggers: fabric.log() is a no-op and log_dir is None
            algo.fabric = L.Fabric(accelerator="cpu", devices=1, loggers=[])
            return algo
        if method == "magmax":
            from fusion_bench.method.magmax import MagMaxAlgorithm

            return MagMaxAlgorithm(scaling_factor=float(job["scaling_factor"]), inplace=True)
        raise ValueError(f"unknown method {method!r}")

    report["runs"] = []
    for spec in job["runs"]:
        method, names = spec["method"], [n for n, _ in spec["models"]]
        pool = SafetensorsPool({"_pretrained_": spec["base"], **dict(spec["models"])})
        if list(pool.model_names) != names:
            raise RuntimeError(f"the model pool reordered the models: {list(pool.model_names)}")
        repeats: list[list[float]] = []
        split_repeats: list[list[dict[str, float]]] = []
        run_seconds: list[float] = []
        merged = None
        for _ in range(max(1, int(spec["repeat"]))):
            STEP = f"construct FusionBench's {method}"
            algo = make_algo(method)
            events.clear()
            STEP = f"run FusionBench's {method}"
            started = time.perf_counter()
            merged = algo.run(pool)
            finished = time.perf_counter()
            # fold k: from loading model k to the loop's next advance (next fold, or its end)
            folds, splits = [], []
            for i, (kind, t0, c0) in enumerate(events):
                if kind == "load":
                    t1, c1 = next(
                        ((t, c) for k, t, c in events[i + 1 :] if k == "next"),
                        (finished, dict(clock)),
                    )
                    folds.append(t1 - t0)
                    splits.append(_split(t1 - t0, {k: c1[k] - c0[k] for k in clock}))
            if len(folds) != len(names):
                raise RuntimeError(f"timed {len(folds)} folds, expected {len(names)}")
            repeats.append(folds)
            split_repeats.append(splits)
            run_seconds.append(finished - started)
        STEP = f"write {method}'s merged state dict"
        state = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
        safetensors.torch.save_file(state, spec["out"])
        report["runs"].append(
            {
                "method": method,
                "out": spec["out"],
                # per fold, the fastest repeat: the least disturbed on a shared machine
                "folds": [min(r[i] for r in repeats) for i in range(len(names))],
                "splits": [
                    min((r[i] for r in split_repeats), key=lambda x: x["total"])
                    for i in range(len(names))
                ],
                "run_seconds": min(run_seconds),
            }
        )


def _split(total: float, spent: dict[str, float]) -> dict[str, float]:
    """One fold's seconds by kind of work (see the module's docstring)."""
    matmul = spent["linear"] - spent["svd"]
    return {
        "total": total,
        "svd": spent["svd"],
        "matmul": matmul,
        "io": spent["load"],
        "other": total - spent["linear"] - spent["load"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", help="job file written by fusionbench_compare.py")
    job = json.loads(Path(parser.parse_args().job).read_text())
    report: dict[str, Any] = {"ok": False}
    try:
        run_all(job, report)
        report["ok"] = True
    except BaseException as exc:  # every failure goes to the caller, which prints it
        report.update(step=STEP, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
    Path(job["report"]).write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
