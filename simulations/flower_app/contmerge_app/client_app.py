"""ClientApp: train the received backbone on this node's part of the tasks.

A SuperNode names its part with ``--node-config "partition-id=0 num-partitions=2"``; the
simulation engine sets both for every virtual node.
"""

from contmerge.simulations.federated.client import make_client_app

app = make_client_app()
