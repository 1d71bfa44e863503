"""contmerge: continual and federated model merging in constant memory."""

from .errors import CheckpointError, ContmergeError, StateError, StorageError, StrategyError
from .merger import FoldResult, IgnoredTensorWarning, Merger
from .registry import available, parse_strategy
from .sources import Checkpoint, open_checkpoint
from .strategy import Chain, FoldContext, Pass, Preprocessor, Strategy, TensorInfo, chain

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

import os as _os

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
