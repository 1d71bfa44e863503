"""``contmerge simulate …`` and ``contmerge demo``: the runnable scenarios.

Each scenario module provides ``add_<name>_arguments(parser)`` and ``main_<name>(args)``; they
are imported only when their command is built, and a scenario whose optional dependencies are
missing shows up as unavailable instead of breaking the other commands.
"""

from __future__ import annotations

import argparse
import importlib

#: scenario -> (module, adder, runner, one-line help)
SCENARIOS: dict[str, tuple[str, str, str, str]] = {
    "continual": (
        "contmerge.simulations.continual",
        "add_continual_arguments",
        "main_continual",
        "fine-tuned models arrive one by one: ACC/BWT over arrival orders",
    ),
    "federated": (
        "contmerge.simulations.federated.cli",
        "add_federated_arguments",
        "main_federated",
        "federated rounds on Flower's simulation engine, vs Flower's FedAvg",
    ),
    "decentralized": (
        "contmerge.simulations.decentralized",
        "add_decentralized_arguments",
        "main_decentralized",
        "DIMAT vs weight averaging over an agent topology",
    ),
    "fw": (
        "contmerge.simulations.fw_pool",
        "add_fw_arguments",
        "main_fw",
        "Frank-Wolfe merging over a pool with irrelevant models",
    ),
}


def add_simulate_parser(sub: argparse._SubParsersAction) -> None:
    simulate = sub.add_parser(
        "simulate",
        help="run a scenario on real offline data",
        description="Runnable scenarios on real offline data.",
    )
    scenarios = simulate.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for name, (module, adder, runner, help_text) in SCENARIOS.items():
        parser = scenarios.add_parser(name, help=help_text, description=help_text)
        try:
            loaded = importlib.import_module(module)
            getattr(loaded, adder)(parser)
            parser.set_defaults(func=getattr(loaded, runner))
        except (ImportError, AttributeError) as exc:
            parser.description = f"{help_text} (unavailable here: {exc})"
            parser.set_defaults(
                func=lambda _args, exc=exc, name=name: _unavailable(name, exc), unavailable=True
            )


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    from .continual import add_demo_arguments, main_demo

    demo = sub.add_parser(
        "demo",
        help="the default continual-merging scenario, end to end, in minutes",
        description="Fine-tune (or load cached) task models on real offline data, stream them "
        "through several strategies over random arrival orders, print ACC/BWT and write a plot.",
    )
    add_demo_arguments(demo)
    demo.set_defaults(func=main_demo)


def _unavailable(name: str, exc: Exception) -> int:
    from contmerge.cli import missing_extra

    return missing_extra(f"simulate {name}", exc)
