"""Flower integration: any contmerge strategy as a Flower strategy (Message API, flwr>=1.41).

- :class:`ContmergeStrategy`: drop-in for ``strategy.start(...)``, or ``start_streaming(...)``
  to fold replies as they are pulled (server memory independent of the number of clients);
  ``merge="round"`` (task vectors of each round's broadcast) or ``"continual"`` (one merge
  across rounds, relative to a fixed base).
- :func:`to_array_record` / :func:`from_array_record`: state dicts <-> ``ArrayRecord``,
  bit-exact for bfloat16 and float8 (which Flower's own conversion refuses).
- :class:`ReplyStream`: push messages, iterate over replies as they arrive.

Importing this package needs ``flwr`` (``pip install 'contmerge[flower]'``).
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy exports: ``contmerge.flower.cli`` (built into ``contmerge --help``) must not pay for
# importing Flower; the names below import it on first use.
_EXPORTS = {
    "ArrayRecordCheckpoint": "arrays",
    "from_array_record": "arrays",
    "tensor_to_array": "arrays",
    "to_array_record": "arrays",
    "ReplyStream": "streaming",
    "ContmergeStrategy": "strategy",
    "RoundReport": "strategy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
