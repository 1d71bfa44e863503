"""The Merger's options as the commands take them: one layer shared by ``merge`` and ``serve``.

``MergerOptions`` holds what a command decides about the merge (the strategy and its settings,
the linear pattern, the another-base limit, the thread budget, device, base verification); the
strategy's hyper-parameters travel as ``settings``, apart from the Merger's own keyword
arguments.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .limits import DEFAULT_MAX_RELATIVE_DELTA


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
