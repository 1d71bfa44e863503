"""The data a data-informed merge needs, given as a file or as a Python entry point.

FW-Merging needs an *objective* (:class:`contmerge.strategies.frank_wolfe.Objective`); DIMAT
needs *calibration* inputs and the model they run through (:class:`Calibration`). Either is
named by one string, ``SPEC``:

- ``module:function`` — a Python entry point called with no arguments; it returns an
  ``Objective`` (FW) or a :class:`Calibration` (DIMAT). The current directory is importable,
  as for ``uvicorn``.
- a ``.safetensors`` file, a *labelled dataset*:

  ============================  ================================================================
  ``x.<task>``                  inputs of target task ``<task>`` (float, first axis: samples)
  ``y.<task>``                  its labels (integer, one per sample); FW only
  ``u.<task>``                  optional unlabelled inputs (FW-soft, the AdaMerging start;
                                default: ``x.<task>``)
  ``head.<task>.weight/.bias``  optional fixed linear head on the model's output (default: the
                                model's output is the logits)
  ``x``                         DIMAT: the calibration inputs (or ``x.<task>`` for one task)
  metadata ``model``            ``module:function`` returning the ``nn.Module`` whose state dict
                                the checkpoints hold (required)
  metadata ``batch_size``       DIMAT's calibration batch size (default 128)
  ============================  ================================================================

Errors are :class:`ObjectiveError`, naming the file or entry point and the reason.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ContmergeError

DEFAULT_BATCH_SIZE = 128


class ObjectiveError(ContmergeError, ValueError):
    """An objective or calibration spec that cannot be loaded; names the spec and the reason."""

    def __init__(self, spec: str, reason: str) -> None:
        super().__init__(f"{spec}: {reason}")
        self.spec, self.reason = spec, reason


@dataclass
class Calibration:
    """DIMAT's data: a model factory, the calibration batches (the same ones on every pass)
    and the permutation spec (default: :func:`~contmerge.strategies.dimat.sequential_spec` of
    the factory's model)."""

    model_factory: Callable[[], nn.Module]
    batches: Sequence[torch.Tensor]
    spec: Any = None  # a dimat.PermutationSpec
    description: dict[str, Any] = field(default_factory=dict)

    def permutation_spec(self) -> Any:
        from contmerge.strategies.dimat import sequential_spec

        if self.spec is not None:
            return self.spec
        model = self.model_factory()
        if not isinstance(model, nn.Sequential):
            raise ObjectiveError(
                self.description.get("spec", "calibration"),
                f"the model is a {type(model).__name__}, not an nn.Sequential: give its "
                "PermutationSpec (an entry point returning Calibration(..., spec=...))",
            )
        return sequential_spec(model)


def is_entry_point(spec: str) -> bool:
    """``module:function`` rather than a file (a Windows drive letter is not a module)."""
    module, sep, function = spec.partition(":")
    return bool(sep) and module.replace(".", "").replace("_", "").isalnum() and bool(function)


def load_entry_point(spec: str) -> Any:
    """Import ``module`` and return ``function`` (not called)."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # ``module`` beside the user, as uvicorn does
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ObjectiveError(spec, f"cannot import module {module_name!r}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ObjectiveError(spec, f"module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ObjectiveError(spec, f"{attr!r} is not callable")
    return target


def _call(spec: str) -> Any:
    try:
        return load_entry_point(spec)()
    except ObjectiveError:
        raise
    except Exception as exc:  # the user's code: say whose it was
        raise ObjectiveError(spec, f"the entry point raised {type(exc).__name__}: {exc}") from exc


def model_factory(spec: str, where: str) -> Callable[[], nn.Module]:
    """A zero-argument callable building the model, checked once."""
    factory = load_entry_point(spec)
    model = _call(spec)
    if not isinstance(model, nn.Module):
        raise ObjectiveError(where, f"model entry point {spec!r} returned {type(model).__name__}")
    return factory


def _read_dataset(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ObjectiveError(str(path), "no such file (expected a .safetensors dataset)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ObjectiveError(str(path), f"not a readable safetensors file: {exc}") from exc
    return tensors, metadata


def _model_of(path: Path, metadata: dict[str, str], model: str | None) -> str:
    spec = model or metadata.get("model")
    if not spec:
        raise ObjectiveError(
            str(path), "no model: put 'model': 'module:function' in the file's metadata"
        )
    if not is_entry_point(spec):
        raise ObjectiveError(str(path), f"model {spec!r} is not module:function")
    return spec


def dataset_hash(path: str | Path) -> str:
    """sha256 of a dataset file's bytes (recorded by a state, checked when it is reopened)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise ObjectiveError(str(path), f"cannot read: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def spec_identity(spec: str) -> str | None:
    """What a state records to recognise the same data later: a file's content hash (an entry
    point has none: its code is the user's)."""
    return None if is_entry_point(spec) else dataset_hash(spec)


# --- FW-Merging objectives ---------------------------------------------------------------------


def _tasks(path: Path, tensors: dict[str, torch.Tensor], prefix: str) -> list[str]:
    tasks = [k[len(prefix) :] for k in tensors if k.startswith(prefix)]
    if not tasks:
        raise ObjectiveError(str(path), f"no tensor named {prefix}<task>")
    return sorted(tasks)


def _head(path: Path, tensors: dict[str, torch.Tensor], task: str) -> nn.Module:
    weight = tensors.get(f"head.{task}.weight")
    if weight is None:
        return nn.Identity()
    if weight.dim() != 2:
        raise ObjectiveError(str(path), f"tensor head.{task}.weight: not a matrix")
    bias = tensors.get(f"head.{task}.bias")
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            if bias.shape != (weight.shape[0],):
                raise ObjectiveError(
                    str(path), f"tensor head.{task}.bias: shape {list(bias.shape)}"
                )
            head.bias.copy_(bias)
    return head


def load_objective(spec: str, *, model: str | None = None) -> Any:
    """An FW-Merging ``Objective`` from a labelled dataset file or an entry point."""
    from contmerge.strategies.frank_wolfe import ClassifierObjective

    if is_entry_point(spec):
        objective = _call(spec)
        for needed in ("tasks", "loss", "adaptation_loss"):
            if not hasattr(objective, needed):
                raise ObjectiveError(
                    spec, f"returned a {type(objective).__name__} without {needed!r}: not an "
                    "Objective (see contmerge.strategies.frank_wolfe.Objective)"
                )  # fmt: skip
        return objective
    path = Path(spec)
    tensors, metadata = _read_dataset(path)
    factory = model_factory(_model_of(path, metadata, model), str(path))
    labelled, unlabelled, heads = {}, {}, {}
    for task in _tasks(path, tensors, "x."):
        x, y = tensors[f"x.{task}"], tensors.get(f"y.{task}")
        if y is None:
            raise ObjectiveError(str(path), f"tensor y.{task} is missing (labels of x.{task})")
        if not x.is_floating_point():
            raise ObjectiveError(str(path), f"tensor x.{task}: {x.dtype}, not float inputs")
        if y.is_floating_point() or y.dim() != 1 or len(y) != len(x):
            raise ObjectiveError(
                str(path), f"tensor y.{task}: want {len(x)} integer labels, got "
                f"{y.dtype} {list(y.shape)}"
            )  # fmt: skip
        labelled[task] = (x, y.long())
        unlabelled[task] = tensors.get(f"u.{task}", x)
        heads[task] = _head(path, tensors, task)
    return ClassifierObjective(factory(), heads, labelled, unlabelled)


# --- DIMAT calibration -------------------------------------------------------------------------


def load_calibration(spec: str, *, model: str | None = None) -> Calibration:
    """DIMAT's :class:`Calibration` from a dataset file (tensor ``x``) or an entry point."""
    if is_entry_point(spec):
        calibration = _call(spec)
        if not isinstance(calibration, Calibration):
            raise ObjectiveError(
                spec, f"returned a {type(calibration).__name__}, not contmerge.objectives."
                "Calibration"
            )  # fmt: skip
        calibration.description.setdefault("spec", spec)
        return calibration
    path = Path(spec)
    tensors, metadata = _read_dataset(path)
    factory = model_factory(_model_of(path, metadata, model), str(path))
    inputs = tensors.get("x")
    if inputs is None:
        tasks = [k for k in tensors if k.startswith("x.")]
        if len(tasks) != 1:
            raise ObjectiveError(str(path), "no tensor x (the calibration inputs)")
        inputs = tensors[tasks[0]]
    if not inputs.is_floating_point() or len(inputs) == 0:
        raise ObjectiveError(str(path), f"tensor x: want float inputs, got {inputs.dtype}")
    try:
        batch_size = int(metadata.get("batch_size", DEFAULT_BATCH_SIZE))
    except ValueError as exc:
        raise ObjectiveError(str(path), "metadata batch_size is not an integer") from exc
    if batch_size < 1:
        raise ObjectiveError(str(path), "metadata batch_size must be at least 1")
    batches = list(inputs.split(batch_size))
    return Calibration(factory, batches, description={"spec": str(path)})
