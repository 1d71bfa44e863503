"""The ClientApp of the federated task scenario: train the received backbone on this node's part.

The node's part comes from its node config (``partition-id``, ``num-partitions``), which the
simulation engine sets for every virtual SuperNode and a real SuperNode gets from
``flower-supernode --node-config "partition-id=0 num-partitions=2"``. Everything else arrives in
the train message (see :mod:`.scenario`).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from contmerge.flower.arrays import from_array_record, record_digest, to_array_record

from .scenario import Scenario, heads_from_bytes, local_train

#: keys of the train message's ConfigRecord
SCENARIO_KEY = "scenario"
HEADS_KEY = "heads"
ROUND_KEY = "server-round"  # set by every Flower strategy


def train_reply(msg: Message, context: Context) -> Message:
    """Train on this node's part; reply with the backbone, ``num-examples`` and the loss.

    The reply also carries, in a ConfigRecord ``received``, the digest of the arrays this node
    received, so the server can check that transport was bit-exact.
    """
    config = msg.content["config"]
    scenario = Scenario.from_json(str(config[SCENARIO_KEY]))
    heads = heads_from_bytes(bytes(config[HEADS_KEY]))  # type: ignore[arg-type]
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    server_round = int(config.get(ROUND_KEY, 0))  # type: ignore[arg-type]
    received = msg.content["arrays"]
    backbone = from_array_record(received, f"round {server_round} broadcast")
    # Seeded by (scenario, node, round) only: every strategy compared in one run gets the same
    # local training noise, so differences come from the aggregation.
    seed = scenario.seed * 1_000_003 + partition_id * 1_009 + server_round
    trained, n, loss = local_train(backbone, heads, scenario, partition_id, num_partitions, seed)
    content = RecordDict(
        {
            "arrays": to_array_record(trained),
            "metrics": MetricRecord({"num-examples": n, "train-loss": loss}),
            "received": ConfigRecord({"sha256": record_digest(received)}),
        }
    )
    return Message(content, reply_to=msg)


def make_client_app() -> ClientApp:
    """A fresh ClientApp with :func:`train_reply` as its ``train`` function."""
    app = ClientApp()
    app.train()(train_reply)
    return app
