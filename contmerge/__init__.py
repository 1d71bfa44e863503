"""contmerge: continual and federated model merging in constant memory."""

from __future__ import annotations

import importlib as _importlib
import os as _os
from typing import TYPE_CHECKING, Any

from .errors import (
    CheckpointError,
    ContmergeError,
    IgnoredTensorWarning,
    StateError,
    StorageError,
    StrategyError,
)

if TYPE_CHECKING:
    from .merger import FoldResult, Merger
    from .registry import available, parse_strategy
    from .sources import Checkpoint, open_checkpoint
    from .strategy import Chain, FoldContext, Pass, Preprocessor, Strategy, TensorInfo, chain

#: names whose modules import torch: loaded on first use, so that the command line answers a
#: no-op (e.g. ``merge`` of checkpoints already folded) without importing torch at all
_LAZY = {
    "FoldResult": "merger",
    "Merger": "merger",
    "available": "registry",
    "parse_strategy": "registry",
    "Checkpoint": "sources",
    "open_checkpoint": "sources",
    **dict.fromkeys(
        ("Chain", "FoldContext", "Pass", "Preprocessor", "Strategy", "TensorInfo", "chain"),
        "strategy",
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'contmerge' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "Chain",
    "Checkpoint",
    "CheckpointError",
    "ContmergeError",
    "FoldContext",
    "FoldResult",
    "IgnoredTensorWarning",
    "Merger",
    "Pass",
    "Preprocessor",
    "StateError",
    "StorageError",
    "Strategy",
    "StrategyError",
    "TensorInfo",
    "available",
    "chain",
    "open_checkpoint",
    "parse_strategy",
]
__version__ = "0.1.0"


# Installed, the merge rules and scenarios are the subpackages contmerge.strategies and
# contmerge.simulations. In a source checkout they sit beside this folder (strategies/,
# simulations/), and a process started in the checkout (``python -m contmerge`` there, or a
# test's subprocess) imports this folder rather than the installed package: let the two
# subpackages resolve from the checkout too.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "strategies")) and _os.path.isfile(
    _os.path.join(_checkout, "strategies", "__init__.py")
):
    __path__.append(_checkout)  # noqa: F821 - a package's own __path__
