"""What a load run measures, and how the parts from several processes are merged.

Ack latencies go into HdrHistograms (microsecond resolution, 3 significant digits, up
to an hour). Recording one value in the pure-Python ``hdrh`` costs ~2 µs, too much at
100k acks/s, so the hot path appends floats to a list and :meth:`Recorder.tick` folds
them into the histograms once per second with ``np.unique`` (one call per distinct
microsecond value). Histograms cross process boundaries in HdrHistogram's standard
compressed encoding and are merged with ``decode_and_add`` — percentiles of merged
histograms are exact to the histogram's precision; averaging per-process p99s is not.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # one hour
SIGNIFICANT = 3
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT)


def record_seconds(histogram: HdrHistogram, latencies: list[float]) -> None:
    """Add latencies given in seconds, vectorized down to one call per distinct µs value."""
    if not latencies:
        return
    micros = np.clip(np.rint(np.asarray(latencies) * 1e6), LOWEST_US, HIGHEST_US).astype(np.int64)
    values, counts = np.unique(micros, return_counts=True)
    for value, count in zip(values.tolist(), counts.tolist(), strict=True):
        histogram.record_value(value, count)


def latency_summary(histogram: HdrHistogram) -> dict[str, float | None]:
    """p50/p90/p99/p99.9/max, mean and stdev in seconds (None when nothing was recorded).

    Mean and stdev come from the histogram too (HdrHistogram's ``get_mean_value`` /
    ``get_stddev``), so they merge across processes exactly like the percentiles.
    """
    if histogram.get_total_count() == 0:
        return {**{key: None for key in PERCENTILES}, "max": None, "min": None, "mean": None, "stdev": None}
    summary = {key: histogram.get_value_at_percentile(p) / 1e6 for key, p in PERCENTILES.items()}
    summary["max"] = histogram.get_max_value() / 1e6
    summary["min"] = histogram.get_min_value() / 1e6
    summary["mean"] = histogram.get_mean_value() / 1e6
    summary["stdev"] = histogram.get_stddev() / 1e6
    return summary


#: The percentiles of the full distribution, as HdrHistogram's percentile output spaces
#: them: halving the distance to 100 % each step (50, 75, 87.5, ...), then the maximum.
DISTRIBUTION_PERCENTILES = (0.0, 10.0, 25.0, 50.0, 75.0, 87.5, 93.75, 96.875, 98.4375, 99.21875, 99.609375,
                            99.8046875, 99.90234375, 99.951171875, 99.9755859375, 99.98779296875, 100.0)


def latency_distribution(histogram: HdrHistogram) -> list[dict]:
    """[{"percentile", "value_s", "count"}]: the latency at each percentile and the acks at
    or below it (HdrHistogram's percentile distribution: Value, Percentile, TotalCount)."""
    total = histogram.get_total_count()
    if total == 0:
        return []
    return [{"percentile": percentile, "value_s": histogram.get_value_at_percentile(percentile) / 1e6,
             "count": min(total, round(total * percentile / 100))} for percentile in DISTRIBUTION_PERCENTILES]


@dataclass
class Totals:
    """Counters of one worker (or merged); every field adds up across workers."""

    sent: int = 0
    batches: int = 0  # acked
    ranges: int = 0
    pages: int = 0
    wire_bytes: int = 0
    rejected_pages: int = 0
    window_stall_s: float = 0.0
    reconnects: int = 0
    sessions: int = 0
    errors: Counter = field(default_factory=Counter)

    def add(self, other: Totals | dict) -> None:
        other = other if isinstance(other, dict) else other.as_dict()
        for key, value in other.items():
            if key == "errors":
                self.errors.update(value)
            else:
                setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict:
        return {"sent": self.sent, "batches": self.batches, "ranges": self.ranges, "pages": self.pages,
                "wire_bytes": self.wire_bytes, "rejected_pages": self.rejected_pages,
                "window_stall_s": self.window_stall_s, "reconnects": self.reconnects,
                "sessions": self.sessions, "errors": dict(self.errors)}


class Recorder:
    """One worker's counters, latencies and per-second timeline."""

    def __init__(self) -> None:
        self.totals = Totals()
        self.latencies: list[float] = []  # seconds, since the last tick
        self.histogram = new_histogram()
        self._last = Totals()

    def tick(self, second: int) -> dict:
        """Close the interval ending now: a timeline record with an encoded histogram."""
        interval = new_histogram()
        record_seconds(interval, self.latencies)
        self.latencies = []
        self.histogram.add(interval)
        now = self.totals.as_dict()
        before = self._last.as_dict()
        record = {key: now[key] - before[key] for key in ("sent", "batches", "ranges", "pages",
                                                          "wire_bytes", "window_stall_s")}
        record["errors"] = sum(now["errors"].values()) - sum(before["errors"].values())
        record["second"] = second
        record["histogram"] = interval.encode() if interval.get_total_count() else None
        self._last = Totals(**{**now, "errors": Counter(now["errors"])})
        return record


class Timeline:
    """Per-second records from every worker, merged by second."""

    def __init__(self) -> None:
        self.seconds: dict[int, dict] = {}

    def add(self, record: dict) -> dict:
        second = record["second"]
        slot = self.seconds.get(second)
        if slot is None:
            slot = self.seconds[second] = {"second": second, "sent": 0, "batches": 0, "ranges": 0,
                                           "pages": 0, "wire_bytes": 0, "window_stall_s": 0.0,
                                           "errors": 0, "histogram": new_histogram()}
        for key in ("sent", "batches", "ranges", "pages", "wire_bytes", "window_stall_s", "errors"):
            slot[key] += record[key]
        if record.get("histogram"):
            slot["histogram"].decode_and_add(record["histogram"])
        return slot

    def rows(self) -> list[dict]:
        """One row per second: rates and latency percentiles in seconds."""
        rows = []
        for second in sorted(self.seconds):
            slot = self.seconds[second]
            summary = latency_summary(slot["histogram"])
            rows.append({"t": second, "batches": slot["batches"], "pages": slot["pages"],
                         "wire_bytes": slot["wire_bytes"], "errors": slot["errors"],
                         "p50_s": summary["p50"], "p99_s": summary["p99"], "max_s": summary["max"]})
        return rows
