"""Runnable scenarios on real offline data (installed as ``contmerge.simulations``).

- ``data``: downstream tasks from Fashion-MNIST and scikit-learn digits (28x28 grayscale).
- ``models``: the merged MLP backbone and per-task heads kept outside the merge.
- ``train``: pretraining, probe heads, independent and sequential fine-tuning, with a disk cache.
- ``evaluate``: per-task accuracy, ACC and BWT.
- ``continual``: the continual-merging scenario runner, its report and CLI.
- ``federated``: federated rounds on Flower's simulation engine, against Flower's FedAvg.
"""
