"""A few thread-safe metrics rendered in the Prometheus text exposition format (version 0.0.4).

Small on purpose: counters with fixed label sets, gauges read at scrape time, and one
histogram, which is all the server needs, without a dependency.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LabelValues = tuple[str, ...]


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped)) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        known: Sequence[LabelValues] = (),
    ) -> None:
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._lock = threading.Lock()
        # series listed up front exist from the first scrape, so rate() sees them start at 0
        self._values: dict[LabelValues, float] = {tuple(k): 0.0 for k in known}
        if not self.labelnames:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, *labelvalues: str) -> None:
        with self._lock:
            self._values[labelvalues] = self._values.get(labelvalues, 0.0) + amount

    def value(self, *labelvalues: str) -> float:
        with self._lock:
            return self._values.get(labelvalues, 0.0)

    def total(self) -> float:
        with self._lock:
            return sum(self._values.values())

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            for values, number in sorted(self._values.items()):
                lines.append(f"{self.name}{_labels(self.labelnames, values)} {_number(number)}")
        return lines


class Gauge:
    """A value set by the server, or computed when scraped (queue depth): never stale."""

    def __init__(self, name: str, help: str, read: Callable[[], float] | None = None) -> None:
        self.name, self.help, self._read = name, help, read
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = float(value)

    def render(self) -> list[str]:
        value = self._read() if self._read is not None else self._value
        return [
            f"# HELP {self.name} {self.help}",
            f"# TYPE {self.name} gauge",
            f"{self.name} {_number(value)}",
        ]


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._lock = threading.Lock()
        self._counts = [0] * len(self.buckets)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            self._sum += value
            self._count += 1
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self._counts[i] += 1
                    break

    def mean(self) -> float:
        with self._lock:
            return self._sum / self._count if self._count else 0.0

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            cumulative = 0
            for bound, count in zip(self.buckets, self._counts):
                cumulative += count
                lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
            lines.append(f"{self.name}_sum {_number(self._sum)}")
            lines.append(f"{self.name}_count {self._count}")
        return lines


Metric = TypeVar("Metric", Counter, Gauge, Histogram)


class Registry:
    def __init__(self) -> None:
        self._metrics: list[Counter | Gauge | Histogram] = []

    def add(self, metric: Metric) -> Metric:
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        return "\n".join(line for m in self._metrics for line in m.render()) + "\n"


ORIGINS = (("http",), ("inbox",))


class ServerMetrics:
    """The merge server's metrics; gauges that read live values are added by the service."""

    def __init__(self) -> None:
        self.registry = Registry()
        add = self.registry.add
        self.accepted = add(
            Counter(
                "contmerge_accepted_total",
                "Checkpoints accepted into the queue.",
                ("origin",),
                ORIGINS,
            )
        )
        self.folded = add(
            Counter(
                "contmerge_folded_total", "Checkpoints folded into the state.", ("origin",), ORIGINS
            )
        )
        self.duplicates = add(
            Counter(
                "contmerge_duplicates_total",
                "Arrivals already folded (no-ops).",
                ("origin",),
                ORIGINS,
            )
        )
        self.rejected = add(
            Counter(
                "contmerge_rejected_total",
                "Arrivals rejected, with nothing merged.",
                ("origin",),
                ORIGINS,
            )
        )
        self.busy = add(
            Counter("contmerge_backpressure_total", "Uploads refused with 503 (queue full).")
        )
        self.upload_bytes = add(
            Counter("contmerge_upload_bytes_total", "Bytes of accepted uploads.")
        )
        self.retries = add(
            Counter(
                "contmerge_retries_total",
                "Folds tried again after a failure that was not the checkpoint's "
                "(disk full, I/O error, out of memory).",
                ("origin",),
                ORIGINS,
            )
        )
        self.timed_out = add(
            Counter(
                "contmerge_uploads_timed_out_total",
                "Uploads cut with 408: no data for --upload-idle-timeout seconds, or slower "
                "than --upload-min-rate.",
            )
        )
        self.no_space = add(
            Counter("contmerge_uploads_no_space_total", "Uploads refused with 507 (disk full).")
        )
        self.fold_seconds = add(
            Histogram(
                "contmerge_fold_seconds",
                "Seconds per fold (duplicates included).",
                (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            )
        )
        self.last_fold = add(
            Gauge("contmerge_last_fold_timestamp_seconds", "Unix time of the last fold.")
        )

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.registry.add(Gauge(name, help, read))

    def render(self) -> str:
        return self.registry.render()
