"""A running weighted average of client MetricRecords, so replies need not be kept for it.

Flower's ``aggregate_metricrecords`` takes the list of all replies; folding replies one at a
time needs the same numbers from running sums instead.
"""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict


class RunningMetrics:
    """Weighted mean of every numeric metric (scalars and equal-length lists) seen so far.

    The weight is the reply's ``weighted_by_key`` value (``num-examples`` by default) or 1 when
    a reply does not carry it; the weight key itself is not averaged.
    """

    def __init__(self, weighted_by_key: str = "num-examples") -> None:
        self.weighted_by_key = weighted_by_key
        self.total_weight = 0.0
        self._sums: dict[str, float | list[float]] = {}

    def add(self, content: RecordDict) -> None:
        for record in content.metric_records.values():
            weight = float(record.get(self.weighted_by_key, 1.0))  # type: ignore[arg-type]
            self.total_weight += weight
            for key, value in record.items():
                if key == self.weighted_by_key:
                    continue
                if isinstance(value, list):
                    old = self._sums.get(key, [0.0] * len(value))
                    if not isinstance(old, list) or len(old) != len(value):
                        continue  # inconsistent across clients: leave it out
                    self._sums[key] = [o + float(v) * weight for o, v in zip(old, value)]
                else:
                    old_scalar = self._sums.get(key, 0.0)
                    if isinstance(old_scalar, list):
                        continue
                    self._sums[key] = old_scalar + float(value) * weight
            break  # one MetricRecord per reply, as Flower's strategies expect

    def result(self) -> MetricRecord | None:
        if self.total_weight <= 0 or not self._sums:
            return None
        w = self.total_weight
        return MetricRecord(
            {k: [x / w for x in v] if isinstance(v, list) else v / w for k, v in self._sums.items()}
        )
