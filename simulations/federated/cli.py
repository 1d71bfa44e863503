"""``contmerge simulate federated``: a contmerge strategy vs FedAvg on Flower's simulation engine.

``contmerge.simulations.cli`` builds the command from :func:`add_federated_arguments` and
:func:`main_federated` (:func:`add_federated_parser` does both for a caller with its own
sub-parsers). Importing this module imports Flower: without it the command shows as unavailable
and names the extra to install.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..data import DIGITS_TASKS, FASHION_TASKS
from ..options import add_no_progress, add_output_dir, names_list, positive_int
from .partition import PARTITION_HELP, parse_partition
from .report import markdown, write_report
from .run import FederatedRun, run_federated
from .scenario import DEFAULT_CACHE, Scenario

DESCRIPTION = (
    "Federated rounds on the real offline tasks (Fashion-MNIST and digits domains) with "
    "Flower's simulation engine: the contmerge strategy and Flower's own FedAvg run in the same "
    "simulation, from the same pretrained backbone, with the same clients. Writes results.md, "
    "results.json and accuracy.png (per-round mean test accuracy)."
)


def add_federated_parser(
    simulate_subparsers: argparse._SubParsersAction,
) -> argparse.ArgumentParser:
    """Add ``federated`` to the ``simulate`` sub-parsers; returns the new parser."""
    parser = simulate_subparsers.add_parser(
        "federated",
        help="a contmerge strategy vs Flower's FedAvg on Flower's simulation engine",
        description=DESCRIPTION,
    )
    add_federated_arguments(parser)
    parser.set_defaults(func=main_federated)
    return parser


def add_federated_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``simulate federated`` (for a caller that made the parser itself)."""
    parser.add_argument("--strategy", default="opcm", help="contmerge strategy spec (default opcm)")
    parser.add_argument(
        "--merge",
        choices=("round", "continual"),
        default="round",
        help="round: fold each round's task vectors relative to the broadcast model; "
        "continual: one merge over all rounds relative to θ0 (default round)",
    )
    parser.add_argument("--clients", type=positive_int, default=4,
                        help="number of clients (default 4)")  # fmt: skip
    parser.add_argument("--rounds", type=positive_int, default=5,
                        help="number of rounds (default 5)")  # fmt: skip
    parser.add_argument("--partition", type=_partition, default="iid", help=PARTITION_HELP)
    parser.add_argument("--tasks", help=f"comma-separated task names (default: the suite's 8): "
                        f"{', '.join(t.name for t in FASHION_TASKS)}; without Fashion-MNIST: "
                        f"{', '.join(t.name for t in DIGITS_TASKS)}")  # fmt: skip
    parser.add_argument("--n-train", type=positive_int, default=1000,
                        help="training samples per task")  # fmt: skip
    parser.add_argument("--n-test", type=positive_int, default=500,
                        help="test samples per task")  # fmt: skip
    parser.add_argument("--local-epochs", type=positive_int, default=1,
                        help="local epochs per round")  # fmt: skip
    parser.add_argument("--lr", type=float, default=5e-4, help="client Adam learning rate")
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="client mini-batch size (default 64)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="data split and training seed")
    parser.add_argument("--timeout", type=float, default=900, help="per-round reply timeout (s)")
    parser.add_argument(
        "--drop-in",
        action="store_true",
        help="run the contmerge strategy through Flower's strategy.start (each round's replies "
        "gathered, then folded) instead of start_streaming (folded as they are pulled)",
    )
    parser.add_argument("--no-fedavg", action="store_true", help="skip the FedAvg baseline")
    add_output_dir(parser, "results/federated-…")
    add_no_progress(parser, "Flower's per-round log (warnings and errors still show)")
    parser.add_argument("--cache-dir", help="where pretrained θ0 and heads are cached")


def _partition(text: str) -> str:
    try:
        parse_partition(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def main_federated(args: argparse.Namespace) -> int:
    """Run ``simulate federated`` with parsed arguments; prints the table, writes the files."""
    if args.no_progress:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    scenario = Scenario(
        partition=args.partition,
        tasks=names_list(args.tasks),
        n_train=args.n_train,
        n_test=args.n_test,
        seed=args.seed,
        local_epochs=args.local_epochs,
        lr=args.lr,
        batch_size=args.batch_size,
    )
    run = FederatedRun(
        strategy=args.strategy,
        merge=args.merge,
        clients=args.clients,
        rounds=args.rounds,
        scenario=scenario,
        streaming=not args.drop_in,
        baseline=not args.no_fedavg,
        timeout=args.timeout,
        cache_dir=args.cache_dir or str(DEFAULT_CACHE),
    )
    results = run_federated(run)
    slug = f"{args.strategy}-{args.merge}-{args.partition}-{args.clients}c".replace(":", "")
    out = Path(args.output_dir or Path("results") / f"federated-{_safe(slug)}")
    paths = write_report(results, out)
    print(markdown(results))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
