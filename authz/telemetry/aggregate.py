"""Metric values aggregated in plain Python, cheap enough for the request path. Pure.

The OpenTelemetry SDK's synchronous instruments cost about 8 microseconds per measurement and
reader on a 2-core host (attribute hashing, locks, exemplar checks): one usage row touches about
ten of them, which would be several percent of a request's CPU. So the request path adds to the
plain accumulators here (a dictionary lookup and a few additions), and the SDK reads them at
collection time (:mod:`authz.telemetry.export`), on the exporter's thread.

Each metric keeps at most :data:`MAX_SERIES` attribute sets; later new sets fold into one series
marked ``otel.metric.overflow`` (the SDK's own cardinality rule), so no client can grow memory or
a dashboard without bound.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MAX_SERIES = 2000
"""Attribute sets kept per metric (the OpenTelemetry SDK's default cardinality limit)."""

Key = tuple[str, ...]
"""Attribute values in the order of the metric's attribute names."""

OVERFLOW: Key = ("\x00overflow",)
"""The key of the series that takes every attribute set past :data:`MAX_SERIES`."""


def _admit(series: Mapping[Key, object], key: Key) -> Key:
    return key if key in series or len(series) < MAX_SERIES else OVERFLOW


@dataclass(frozen=True, slots=True)
class Instrument:
    """What a metric is called and what its series are keyed by."""

    name: str
    unit: str
    description: str
    attributes: tuple[str, ...]

    def labels(self, key: Key) -> dict[str, str | bool]:
        """The attributes of the series ``key``, empty values left out."""
        if key == OVERFLOW:
            return {"otel.metric.overflow": True}
        return {name: value for name, value in zip(self.attributes, key, strict=True) if value}


class Sum:
    """A monotonic counter per attribute set."""

    __slots__ = ("instrument", "values")

    def __init__(self, instrument: Instrument) -> None:
        self.instrument = instrument
        self.values: dict[Key, float] = {}

    def add(self, key: Key, amount: float = 1) -> None:
        """Add ``amount`` (not negative) to the series ``key``."""
        values = self.values
        key = _admit(values, key)
        values[key] = values.get(key, 0) + amount

    def snapshot(self) -> list[tuple[Key, float]]:
        """Every series and its total (``list(dict.items())`` runs without releasing the GIL)."""
        return list(self.values.items())


class HistogramSeries:
    """Bucket counts, count, sum, min and max of one attribute set."""

    __slots__ = ("count", "counts", "max", "min", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.count = 0
        self.total = 0.0
        self.min = float("inf")
        self.max = float("-inf")


class Histogram:
    """An explicit-bucket histogram per attribute set (bounds are upper-inclusive, as in OTLP)."""

    __slots__ = ("bounds", "instrument", "series")

    def __init__(self, instrument: Instrument, bounds: Sequence[float]) -> None:
        self.instrument = instrument
        self.bounds = tuple(bounds)
        self.series: dict[Key, HistogramSeries] = {}

    def record(self, key: Key, value: float) -> None:
        """Count ``value`` in the series ``key``."""
        series = self.series.get(key)
        if series is None:
            key = _admit(self.series, key)
            series = self.series.get(key)
            if series is None:
                series = self.series[key] = HistogramSeries(len(self.bounds) + 1)
        series.counts[bisect_left(self.bounds, value)] += 1
        series.count += 1
        series.total += value
        if value < series.min:
            series.min = value
        if value > series.max:
            series.max = value

    def snapshot(self) -> list[tuple[Key, list[int], int, float, float, float]]:
        """``(key, bucket counts, count, sum, min, max)`` of every series, copied."""
        return [(key, list(s.counts), s.count, s.total, s.min, s.max) for key, s in list(self.series.items())]
