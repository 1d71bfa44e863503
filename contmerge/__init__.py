"""contmerge: continual and federated model merging in constant memory."""

from .errors import CheckpointError, ContmergeError, StateError, StrategyError
from .merger import FoldResult, Merger
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
    "Merger",
    "Pass",
    "Preprocessor",
    "StateError",
    "Strategy",
    "StrategyError",
    "TensorInfo",
    "available",
    "chain",
    "open_checkpoint",
    "parse_strategy",
]
__version__ = "0.1.0"
