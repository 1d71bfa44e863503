"""FW-Merging as a Flower strategy: clients send candidates, the server runs the FW step.

:class:`FwStrategy` is :class:`~contmerge.flower.strategy.ContmergeStrategy` in its continual
mode over a durable FW state (:class:`~contmerge.fw_served.ServedFw`): every valid reply of
every round joins the pool (a copy kept in ``state_dir``; a reply identical to one already in
the pool is a duplicate), the FW iterations owed for it run with the server's objective, and
the next round broadcasts the current θ. ``start_streaming`` takes replies as they are pulled.
A restarted server resumes the pool, θ and the iteration log from ``state_dir``.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.supercore import log

from ..fw_served import ServedFw
from .strategy import ContmergeStrategy


class FwStrategy(ContmergeStrategy):
    """``FwStrategy(base="base.safetensors", objective="objective.safetensors",
    state_dir="fw-state/", settings={"iterations": 2})``; other keyword arguments are
    ContmergeStrategy's/FedAvg's (sampling, ``min_replies``, streaming knobs)."""

    def __init__(
        self,
        *,
        base: str | Path,
        objective: str,
        state_dir: str | Path,
        settings: Mapping[str, Any] | None = None,
        model: str | None = None,
        **kwargs: Any,
    ) -> None:
        # the fold rule is unused: make_merger returns the FW state instead of a Merger
        super().__init__("average", merge="continual", base=base, state_dir=state_dir, **kwargs)
        self.objective, self.model = objective, model
        self.settings = dict(settings or {})

    def make_merger(self, base: Any) -> ServedFw:  # type: ignore[override]
        assert self.state_dir is not None
        return ServedFw(Path(self.state_dir), base, self.objective, self.settings, self.model)

    def summary(self) -> None:
        log(INFO, "\t├──> contmerge FW-Merging: objective %s, settings %s", self.objective,
            self.settings)  # fmt: skip
        log(INFO, "\t├──> merge state: %s", self.state_dir)
