"""Push messages, then hand back their replies one at a time as they arrive.

``Grid.send_and_receive`` returns only when every reply is in (or the timeout hits), holding
all of them in a list: server memory grows with the number of clients. :class:`ReplyStream`
pushes the same messages with ``grid.push_messages`` and pulls replies with
``grid.pull_messages`` in small batches, yielding each reply and keeping no reference to it,
so a consumer that folds and drops each reply holds at most ``pull_batch`` of them.
:class:`StreamingGrid` is a Grid whose ``send_and_receive`` of train messages returns such a
stream, so that Flower's own round loop (``Strategy.start``) hands it to ``aggregate_train``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from logging import WARNING
from typing import TYPE_CHECKING

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

if TYPE_CHECKING:
    from flwr.proto.node_pb2 import NodeInfo
    from flwr.supercore.run import Run


class ReplyStream:
    """Iterate over the replies to ``messages`` in arrival order, until all came or time ran out.

    After iteration, :attr:`missing` names the nodes that did not answer in time and
    :attr:`unsent` those whose message the SuperLink did not accept.

    ``pull_batch`` bounds how many replies one pull brings into this process at once; a
    larger batch means fewer pull requests to a remote SuperLink.

    ``max_in_flight`` bounds how many messages are out at once: the next one is pushed only
    when a reply has been handed over and the consumer came back for the next. Replies that
    arrive while the consumer is busy wait in the SuperLink (in the server process, for the
    simulation engine); without this bound, a consumer slower than the clients lets them pile
    up there, in proportion to the number of clients. ``None`` pushes everything at once
    (maximum parallelism: right when folding keeps up with the clients).
    """

    def __init__(
        self,
        grid: Grid,
        messages: Iterable[Message],
        *,
        timeout: float | None,
        poll_interval: float = 0.1,
        pull_batch: int = 4,
        max_in_flight: int | None = None,
    ) -> None:
        if pull_batch < 1:
            raise ValueError("pull_batch must be at least 1")
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1 (or None for no limit)")
        self.grid = grid
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.pull_batch = pull_batch
        self.max_in_flight = max_in_flight
        self.unsent: list[int] = []
        self.missing: list[int] = []
        self.sent: list[int] = []
        self._waiting: deque[Message] = deque(messages)
        self._pending: dict[str, int] = {}
        self._push(max_in_flight or len(self._waiting))

    def _push(self, count: int) -> None:
        batch = [self._waiting.popleft() for _ in range(min(count, len(self._waiting)))]
        if not batch:
            return
        destinations = [m.metadata.dst_node_id for m in batch]
        ids = list(self.grid.push_messages(batch))
        del batch  # the SuperLink has them now
        unsent = [n for i, n in enumerate(destinations) if i >= len(ids) or not ids[i]]
        for message_id, node in zip(ids, destinations):
            if message_id:
                self._pending[message_id] = node
                self.sent.append(node)
        if unsent:
            log(WARNING, "the SuperLink did not accept messages for nodes %s", unsent)
            self.unsent.extend(unsent)

    def __iter__(self) -> Iterator[Message]:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while (self._pending or self._waiting) and (
            deadline is None or time.monotonic() < deadline
        ):
            if not self._pending:  # every message out so far was refused: try the next ones
                self._push(self.max_in_flight or len(self._waiting))
                continue
            arrived = False
            pending_ids = list(self._pending)
            for start in range(0, len(pending_ids), self.pull_batch):
                replies = list(
                    self.grid.pull_messages(pending_ids[start : start + self.pull_batch])
                )
                while replies:
                    reply = replies.pop(0)  # keep no reference once the consumer has it
                    if self._pending.pop(reply.metadata.reply_to_message_id, None) is None:
                        continue  # not one of ours (or a duplicate delivery)
                    arrived = True
                    yield reply
                    del reply
                    if self.max_in_flight is not None:
                        self._push(1)  # the consumer is done with one: let one more go
            if not arrived:
                time.sleep(self.poll_interval)
        # Nodes whose message never left (window still full at the deadline) did not answer
        # either: they count as missing.
        never_sent = [m.metadata.dst_node_id for m in self._waiting]
        self._waiting.clear()
        self.missing = sorted([*self._pending.values(), *never_sent])


class StreamingGrid(Grid):
    """``grid`` as it is, except that ``send_and_receive`` of train messages returns a
    :class:`ReplyStream` (iterable once) instead of the list of every reply.

    Evaluation and other messages go through ``grid.send_and_receive`` unchanged: their replies
    are metrics, small, and strategies may read them more than once.
    """

    def __init__(
        self,
        grid: Grid,
        *,
        poll_interval: float = 0.1,
        pull_batch: int = 4,
        max_in_flight: int | None = None,
    ) -> None:
        self.grid = grid
        self.poll_interval = poll_interval
        self.pull_batch = pull_batch
        self.max_in_flight = max_in_flight

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return self.grid.send_and_receive(messages, timeout=timeout)
        return ReplyStream(
            self.grid,
            messages,
            timeout=timeout,
            poll_interval=self.poll_interval,
            pull_batch=self.pull_batch,
            max_in_flight=self.max_in_flight,
        )

    # --- everything else is the wrapped grid's ---------------------------------------------
    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)
