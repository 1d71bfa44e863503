"""Push messages, then hand back their replies one at a time as they arrive.

``Grid.send_and_receive`` returns only when every reply is in (or the timeout hits), holding
all of them in a list: server memory grows with the number of clients. :class:`ReplyStream`
pushes the same messages with ``grid.push_messages`` and pulls replies with
``grid.pull_messages`` in small batches, yielding each reply and keeping no reference to it,
so a consumer that folds and drops each reply holds at most ``pull_batch`` of them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from logging import WARNING

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore import log


class ReplyStream:
    """Iterate over the replies to ``messages`` in arrival order, until all came or time ran out.

    After iteration, :attr:`missing` names the nodes that did not answer in time and
    :attr:`unsent` those whose message the SuperLink did not accept.

    ``pull_batch`` bounds how many replies one pull may bring in (and so how many are in
    server memory at once); a larger batch means fewer pull requests to a remote SuperLink.
    """

    def __init__(
        self,
        grid: Grid,
        messages: Iterable[Message],
        *,
        timeout: float | None,
        poll_interval: float = 0.1,
        pull_batch: int = 4,
    ) -> None:
        if pull_batch < 1:
            raise ValueError("pull_batch must be at least 1")
        self.grid = grid
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.pull_batch = pull_batch
        self.unsent: list[int] = []
        self.missing: list[int] = []
        messages = list(messages)
        destinations = [m.metadata.dst_node_id for m in messages]
        ids = list(grid.push_messages(messages))
        del messages  # the SuperLink has them now
        self._pending: dict[str, int] = {}
        for message_id, node in zip(ids, destinations):
            if message_id:
                self._pending[message_id] = node
            else:
                self.unsent.append(node)
        if len(ids) < len(destinations):  # a Grid that returns only the accepted ids
            self.unsent.extend(destinations[len(ids) :])
        if self.unsent:
            log(WARNING, "the SuperLink did not accept messages for nodes %s", self.unsent)
        self.sent = sorted(self._pending.values())

    def __iter__(self) -> Iterator[Message]:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while self._pending and (deadline is None or time.monotonic() < deadline):
            arrived = False
            pending_ids = list(self._pending)
            for start in range(0, len(pending_ids), self.pull_batch):
                replies = list(self.grid.pull_messages(pending_ids[start : start + self.pull_batch]))
                while replies:
                    reply = replies.pop(0)  # keep no reference once the consumer has it
                    if self._pending.pop(reply.metadata.reply_to_message_id, None) is None:
                        continue  # not one of ours (or a duplicate delivery)
                    arrived = True
                    yield reply
                    del reply
            if not arrived:
                time.sleep(self.poll_interval)
        self.missing = sorted(self._pending.values())
