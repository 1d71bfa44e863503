"""The Merger's options as the commands take them: one layer shared by ``merge`` and ``serve``.

``add_merger_arguments`` gives both parsers the options they share (the state, the strategy
and its ``--set`` settings, the linear pattern, the another-base limit, the thread budget, the
merged model's dtype, the header bound), each with one help text; ``MergerOptions`` holds what a
command decided about the merge. The strategy's hyper-parameters travel as ``settings``, apart
from the Merger's own keyword arguments. Only argparse at import time: every command's parser
is built from here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import SettingError
from .limits import DEFAULT_MAX_RELATIVE_DELTA, MAX_HEADER_ENV, parse_size
from .threads import THREADS_ENV, parse_threads

T = TypeVar("T")

#: what --threads means, for every command that folds or emits (``contmerge.threads``)
THREADS_HELP = (
    "compute threads a fold or emit may use, in all: our fold threads (chunks, or whole tensors "
    "for OPCM) with torch single-threaded in each, or torch's pool where we do not split the "
    f"work (default: ${THREADS_ENV}, else $OMP_NUM_THREADS, else one per usable core, at most "
    "4; on a busy shared machine fewer keeps folds from slowing down), e.g. --threads 1"
)


def option_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """``parse`` as an argparse type: its SettingError becomes argparse's one-line usage error."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except SettingError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _check_out_dtype(text: str) -> str:
    from .dtypes import parse_out_dtype  # imports torch: only when the option is given

    parse_out_dtype(text)
    return text  # the Merger's emit and the server take the name


size_type = option_type(parse_size)
threads_type = option_type(parse_threads)
out_dtype_type = option_type(_check_out_dtype)


def add_threads_option(parser: argparse.ArgumentParser, *names: str) -> None:
    """``--threads N`` (plus any older ``names`` of it, e.g. merge's ``--workers``)."""
    parser.add_argument(
        "--threads", *names, dest="threads", type=threads_type, metavar="N", help=THREADS_HELP
    )


def add_out_dtype_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out-dtype",
        type=out_dtype_type,
        metavar="DTYPE",
        help="dtype of the merged model's float tensors, as it is written (merge --out, emit) "
        "or served (serve's GET /model): base (the default: the base's dtype), float32, "
        "bfloat16, float16 or float64",
    )


def add_max_header_bytes_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-header-bytes",
        type=size_type,
        metavar="SIZE",
        help="refuse safetensors headers and shard indexes larger than this, e.g. 64M (default: "
        f"${MAX_HEADER_ENV}, else 16M); serve applies it to uploads (a larger header gets 413 "
        "as soon as its first 8 bytes arrive), the inbox and the folds",
    )


def add_merger_arguments(parser: argparse.ArgumentParser, *thread_names: str) -> None:
    """The options ``merge`` and ``serve`` share, one help text each (``thread_names``: older
    names of ``--threads``). Each command adds ``--base`` and what is its own."""
    parser.add_argument(
        "--state", required=True, help="state directory (created on first use, then resumed)"
    )
    parser.add_argument(
        "--strategy",
        help="strategy spec, e.g. opcm, 'opcm(alpha=0.3)', 'chain(dare(p=0.9), ties())' "
        "(needed only when creating the state; `contmerge strategies` lists them)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a hyper-parameter of the strategy (repeatable)",
    )
    parser.add_argument(
        "--linear",
        help="regex of tensor names to treat as nn.Linear weights "
        "(default: exact from a module/model directory, else 2-D *.weight)",
    )
    parser.add_argument(
        "--max-relative-delta",
        type=float,
        default=DEFAULT_MAX_RELATIVE_DELTA,
        help="refuse a checkpoint whose weight matrices moved, in the median, by more than this "
        "fraction of their norm in the base: fine-tuned from another base (default %(default)s)",
    )
    parser.add_argument(
        "--any-base",
        action="store_true",
        help="do not refuse checkpoints that look fine-tuned from another base",
    )
    add_threads_option(parser, *thread_names)
    add_out_dtype_option(parser)
    add_max_header_bytes_option(parser)


def parse_settings(pairs: Sequence[str]) -> dict[str, object]:
    """``--set KEY=VALUE`` pairs as the strategy's hyper-parameters (values parsed as specs)."""
    from .registry import parse_value  # imports the rules, and torch

    settings: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        settings[key.strip()] = parse_value(value.strip())
    return settings


@dataclass(frozen=True)
class MergerOptions:
    strategy: str | None = None
    #: the strategy's hyper-parameters (``--set``), given to ``parse_strategy``
    settings: Mapping[str, Any] = field(default_factory=dict)
    linear: str | None = None
    max_relative_delta: float | None = DEFAULT_MAX_RELATIVE_DELTA
    #: the fold's compute-thread budget (``contmerge.threads``; None: its default)
    threads: int | None = None
    device: str | None = None
    verify_base: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MergerOptions:
        """From a command's parsed options (``--any-base`` lifts the limit); a command without
        ``--threads``, ``--device`` or ``--verify-base`` gets their defaults."""
        return cls(
            strategy=args.strategy,
            settings=parse_settings(args.set),
            linear=args.linear,
            max_relative_delta=None if args.any_base else args.max_relative_delta,
            threads=getattr(args, "threads", None),
            device=getattr(args, "device", None),
            verify_base=getattr(args, "verify_base", False),
        )

    def merger_kwargs(self) -> dict[str, Any]:
        """The Merger's keyword arguments (``strategy`` goes as its second argument)."""
        return {
            "settings": dict(self.settings),
            "linear": self.linear,
            "max_relative_delta": self.max_relative_delta,
            "threads": self.threads,
            "device": self.device,
            "verify_base": self.verify_base,
        }
