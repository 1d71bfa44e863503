"""Flower's simulation engine in-process: the Ray backend settings and ``run_simulation``.

The scenarios built on it (``contmerge simulate federated``, the decentralized DIMAT run) live
in ``contmerge.simulations``; this module is what they share with any script of their own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

__all__ = ["backend_config", "run_in_process"]


def backend_config(cpus: int | None = None) -> dict[str, Any]:
    """Ray backend: one CPU per virtual client, as many clients in parallel as cores."""
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus or os.cpu_count() or 1, "log_to_driver": False},
    }


def run_in_process(
    server_app: ServerApp,
    client_app: ClientApp,
    num_supernodes: int,
    cpus: int | None = None,
) -> None:
    """Flower's ``run_simulation`` on :func:`backend_config`, without its deprecation notice.

    Flower 1.41–1.42 warn that ``run_simulation`` is deprecated in favour of ``flwr run``, yet
    it is their only in-process simulation API (``flwr run`` needs a SuperLink and an app on
    disk: docs/flower.md shows that route). Calling it on purpose, the advice is noise to the
    user; every other Flower message still shows.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from flwr.simulation import run_simulation as flower_run_simulation

    with _quiet_run_simulation_deprecation():
        flower_run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_supernodes,
            backend_config=backend_config(cpus),  # type: ignore[arg-type]
        )


class _DropRunSimulationDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


@contextmanager
def _quiet_run_simulation_deprecation() -> Iterator[None]:
    from flwr.common.logger import FLOWER_LOGGER

    quiet = _DropRunSimulationDeprecation()
    FLOWER_LOGGER.addFilter(quiet)
    try:
        yield
    finally:
        FLOWER_LOGGER.removeFilter(quiet)
