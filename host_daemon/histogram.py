"""A fixed-bucket latency histogram cheap enough for the per-batch path.

prometheus-client's ``Histogram.observe`` walks every bucket under a lock (~2 µs);
here one ``bisect`` finds the bucket (~0.2 µs) and the cumulative counts Prometheus
wants are built at scrape time. The same object answers the admin API's p99s: over the
guest's whole life, and over the last ``RECENT_SECONDS`` (a ring of ``RECENT_SLOTS``
bucket arrays), so one slow batch at start — or an hour ago — does not pin the p99
a person reads for the rest of the session.
"""

from __future__ import annotations

from bisect import bisect_left
from time import monotonic

#: Apply-time buckets resolving 10 µs .. 1 s (docs/API.md: sub-millisecond acks).
APPLY_BUCKETS = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0,
)


#: The recent window of ``recent_quantile``: 10 slots of 30 s, so it covers the last 4.5-5 minutes.
RECENT_SECONDS = 300.0
RECENT_SLOTS = 10
SLOT_SECONDS = RECENT_SECONDS / RECENT_SLOTS


class LatencyHistogram:
    __slots__ = ("bounds", "counts", "sum", "count", "_clock", "_slot", "_current", "_ring", "_stamps")

    def __init__(self, bounds=APPLY_BUCKETS, clock=monotonic) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last slot: above the largest bound (+Inf)
        self.sum = 0.0
        self.count = 0
        self._clock = clock
        self._ring = [[0] * len(self.counts) for _ in range(RECENT_SLOTS)]
        self._stamps = [None] * RECENT_SLOTS  # the time slot each ring entry counts
        self._slot = None
        self._current = self._ring[0]

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus: le).
        index = bisect_left(self.bounds, seconds)
        self.counts[index] += 1
        self.sum += seconds
        self.count += 1
        slot = int(self._clock() // SLOT_SECONDS)
        if slot != self._slot:
            self._enter(slot)
        self._current[index] += 1

    def _enter(self, slot: int) -> None:
        """Start counting time slot ``slot`` in its ring entry (emptied if it held an older one)."""
        at = slot % RECENT_SLOTS
        if self._stamps[at] != slot:
            self._ring[at] = [0] * len(self.counts)
            self._stamps[at] = slot
        self._slot = slot
        self._current = self._ring[at]

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
        return self._bound(q, self.counts, self.count)

    def recent_quantile(self, q: float) -> float | None:
        """``quantile`` over the batches of the last RECENT_SECONDS only (None: none in that time)."""
        oldest = int(self._clock() // SLOT_SECONDS) - RECENT_SLOTS + 1
        counts = [0] * len(self.counts)
        for stamp, slot_counts in zip(self._stamps, self._ring, strict=True):
            if stamp is not None and stamp >= oldest:
                for index, count in enumerate(slot_counts):
                    counts[index] += count
        return self._bound(q, counts, sum(counts))

    def _bound(self, q: float, counts: list[int], total: int) -> float | None:
        if not total:
            return None
        rank = q * total
        seen = 0
        for bound, count in zip(self.bounds, counts, strict=False):
            seen += count
            if seen >= rank:
                return bound
        return self.bounds[-1]
