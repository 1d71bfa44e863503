"""Flower app: federated merging with a contmerge strategy on the offline task scenario."""
