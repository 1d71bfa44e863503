"""The federated scenario on Flower's simulation engine (``contmerge simulate federated``).

Built on the Flower integration (``contmerge.flower``: the strategy, array transport, the
simulation engine's settings) and on this package's tasks, models and training:

- ``partition``: the pooled training samples of several tasks split among clients.
- ``scenario``: what the server prepares (θ0, frozen heads, the evaluator), what clients train.
- ``client``: the ClientApp (also the one of ``simulations/flower_app``).
- ``run``: one simulation running a contmerge strategy and Flower's FedAvg side by side.
- ``report``: the results as a table, JSON and a plot; ``cli``: the command.
"""
