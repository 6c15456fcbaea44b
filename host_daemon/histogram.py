"""A fixed-bucket latency histogram cheap enough for the per-batch path.

prometheus-client's ``Histogram.observe`` walks every bucket under a lock (~2 µs);
here one ``bisect`` finds the bucket (~0.2 µs) and the cumulative counts Prometheus
wants are built at scrape time. The same object answers the admin API's p99.
"""

from __future__ import annotations

from bisect import bisect_left

#: Apply-time buckets resolving 10 µs .. 1 s (DESIGN §5: sub-millisecond acks).
APPLY_BUCKETS = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0,
)


class LatencyHistogram:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds=APPLY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last slot: above the largest bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus: le).
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def merge(self, other: LatencyHistogram) -> None:
        counts = self.counts
        for index, count in enumerate(other.counts):
            counts[index] += count
        self.sum += other.sum
        self.count += other.count

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, cumulative count), ...]`` ending with ``+Inf``, for HistogramMetricFamily."""
        total = 0
        buckets = []
        for bound, count in zip(self.bounds, self.counts, strict=False):
            total += count
            buckets.append((repr(float(bound)), total))
        buckets.append(("+Inf", total + self.counts[-1]))
        return buckets

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile ``q`` (None with no samples).

        Conservative like Prometheus's histogram_quantile at a bucket edge: the true
        value is at most this. Above the last bound it answers the last bound.
        """
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            seen += count
            if seen >= rank:
                return bound
        return self.bounds[-1]
