"""Flower integration: any contmerge strategy as a Flower strategy (Message API, flwr>=1.41).

- :class:`ContmergeStrategy`: drop-in for ``strategy.start(...)``, or ``start_streaming(...)``
  to fold replies as they are pulled (server memory independent of the number of clients);
  ``merge="round"`` (task vectors of each round's broadcast) or ``"continual"`` (one merge
  across rounds, relative to a fixed base).
- :func:`to_array_record` / :func:`from_array_record`: state dicts <-> ``ArrayRecord``,
  bit-exact for bfloat16 and float8 (which Flower's own conversion refuses).
- :class:`ReplyStream`: push messages, iterate over replies as they arrive;
  :class:`StreamingGrid`: a Grid whose train replies come as such a stream.
- ``simulate``: Flower's simulation engine in-process (Ray backend settings, quiet
  ``run_simulation``).

The scenarios built on it live in ``contmerge.simulations`` (``federated``,
``decentralized_flower``), never the other way round. Importing this package needs ``flwr``
(``pip install 'contmerge[flower]'``).
"""

from .arrays import ArrayRecordCheckpoint, from_array_record, tensor_to_array, to_array_record
from .strategy import ContmergeStrategy, RoundReport
from .streaming import ReplyStream, StreamingGrid

__all__ = [
    "ArrayRecordCheckpoint",
    "ContmergeStrategy",
    "ReplyStream",
    "RoundReport",
    "StreamingGrid",
    "from_array_record",
    "tensor_to_array",
    "to_array_record",
]
