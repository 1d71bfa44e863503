"""Accuracy of backbone state dicts on tasks, and the continual-merging metrics ACC and BWT.

An accuracy table ``table[t][i]`` holds the accuracy of the merged model right after the t-th
arrival (0-based) on the i-th arrived task, for i <= t (tasks seen so far), as in OPCM's
``evaluate_on_every_step``:

- ACC = mean_i table[T-1][i]: mean accuracy of the final merged model over all T tasks.
- BWT = 1/(T-1) * sum_{i<T-1} (table[T-1][i] - table[i][i]): how much a task's accuracy changed
  between the step it arrived and the end (negative = forgetting).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .data import Task
from .models import Backbone, ModelConfig, StateDict, head_from_state

AccTable = Sequence[Sequence[float]]


class Evaluator:
    """Scores any backbone state dict on any subset of tasks, each with that task's own head.

    Heads are fixed per task, so differences between backbones are differences of the backbone.
    One Backbone module is reused (states are copied into it), so evaluation allocates nothing
    per call beyond activations.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        heads: Mapping[str, StateDict | torch.nn.Module],
        model_cfg: ModelConfig | None = None,
        *,
        batch_size: int = 2048,
    ) -> None:
        self.model_cfg = model_cfg or ModelConfig()
        self.tasks = {t.name: t for t in tasks}
        missing = [n for n in self.tasks if n not in heads]
        if missing:
            raise KeyError(f"no head for task(s) {missing}")
        # a linear head's state dict, or any head module (e.g. fixed cosine heads)
        self.heads = {
            n: h if isinstance(h, torch.nn.Module) else head_from_state(h, self.model_cfg)
            for n, h in ((n, heads[n]) for n in self.tasks)
        }
        self.backbone = Backbone(self.model_cfg).eval()
        self.batch_size = batch_size
        self.calls = 0  # number of (state, task) evaluations, for tests and timing

    @torch.no_grad()
    def accuracy(self, state: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, float]:
        """Test accuracy (fraction in [0, 1]) of the backbone ``state`` on each named task."""
        self.backbone.load_state_dict(dict(state), strict=True)
        out: dict[str, float] = {}
        for name in names:
            task = self.tasks[name]
            correct = 0
            for i in range(0, len(task.x_test), self.batch_size):
                logits = self.heads[name](self.backbone(task.x_test[i : i + self.batch_size]))
                correct += int((logits.argmax(1) == task.y_test[i : i + self.batch_size]).sum())
            out[name] = correct / len(task.x_test)
            self.calls += 1
        return out


def acc_bwt(table: AccTable) -> tuple[float, float]:
    """(ACC, BWT) from a lower-triangular accuracy table (see module docstring).

    BWT is 0.0 for a single task (no earlier task to forget).
    """
    n = len(table)
    if n == 0:
        raise ValueError("empty accuracy table")
    for t, row in enumerate(table):
        if len(row) != t + 1:
            raise ValueError(f"row {t} has {len(row)} entries, expected {t + 1} (tasks seen)")
    final = table[-1]
    acc = float(np.mean(final))
    bwt = float(np.mean([final[i] - table[i][i] for i in range(n - 1)])) if n > 1 else 0.0
    return acc, bwt


def seen_mean(table: AccTable) -> list[float]:
    """Mean accuracy on the tasks seen so far after each arrival (the curve that gets plotted)."""
    return [float(np.mean(row)) for row in table]


def table_from_fixed(per_task: Mapping[str, float], order: Sequence[str]) -> list[list[float]]:
    """Accuracy table of an order-independent reference (e.g. θ0): the same number every step."""
    return [[per_task[order[i]] for i in range(t + 1)] for t in range(len(order))]


def bounds(
    evaluator: Evaluator,
    base: StateDict,
    finetuned: Mapping[str, StateDict],
) -> dict[str, dict[str, float]]:
    """Reference points: θ0 on every task, and each fine-tuned model on its own task."""
    names = list(finetuned)
    pretrained = evaluator.accuracy(base, names)
    individual = {n: evaluator.accuracy(finetuned[n], [n])[n] for n in names}
    return {"pretrained": pretrained, "individual": individual}
