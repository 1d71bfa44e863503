"""Options every ``contmerge simulate`` command shares, spelt one way, and their checks.

``--output-dir`` everywhere (``--out``, the federated command's older spelling, is still
accepted, unlisted); ``--no-progress`` or ``--quiet``, as ``contmerge merge``; counts must be
positive; a task list names only tasks that exist, and a wrong one is a one-line error listing
the valid names.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from contmerge.errors import SettingError


def add_output_dir(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--output-dir",
        default=None,
        help=f"where results.json, results.md and the plots go (default {default})",
    )
    parser.add_argument("--out", dest="output_dir", help=argparse.SUPPRESS)


def add_no_progress(parser: argparse.ArgumentParser, what: str = "progress bars") -> None:
    parser.add_argument("--no-progress", "--quiet", action="store_true", help=f"hide {what}")


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def names_list(text: str | None) -> tuple[str, ...] | None:
    """``"a, b"`` -> ``("a", "b")``; ``None`` stays ``None`` (the scenario's default)."""
    if text is None:
        return None
    return tuple(t.strip() for t in text.split(",") if t.strip())


def check_names(
    requested: Iterable[str], available: Iterable[str], option: str, context: str = ""
) -> None:
    """Refuse names not in ``available``, listing the valid ones (a :class:`SettingError`)."""
    known = list(available)
    unknown = [n for n in requested if n not in known]
    if unknown:
        where = f" {context}" if context else ""
        raise SettingError(
            f"{option}: unknown {', '.join(map(repr, unknown))}{where}; valid: {', '.join(known)}"
        )
