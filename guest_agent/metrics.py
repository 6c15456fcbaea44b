"""The guest's own /metrics and /healthz (guest_agent/httpd.py, a private CollectorRegistry).

Counters and the ack-latency histogram are updated as things happen; gauges that are
a view of the agent's state (memory, free, reported, isolated, inflated, window) are read
at scrape time by a custom collector, so they can never drift from the allocator.
``balloon_guest_reported_bytes`` is "reported and not reused now": the number the host's
``balloon_reported_bytes{guest}`` must converge to once the guest is quiet. ``DEPRECATED``
names are exported beside their replacement through the 0.2 releases (gone in 0.3).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from shared.standard_metrics import register_standard

from . import httpd
from .batches import KINDS
from .httpd import HttpServer

# One series per counter, not two: the *_created timestamps only double the scrape.
disable_created_metrics()

log = logging.getLogger("guest_agent.metrics")

#: 10 µs .. 10 s: resolves sub-millisecond acks on a local socket and slow hosts alike.
ACK_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
               0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GuestMetrics:
    """Every metric the agent exports; one instance per agent, in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.batches = Counter("balloon_guest_batches_total", "Batch messages sent, by kind.", ["kind"], registry=r)
        self.pages = Counter("balloon_guest_pages_total", "Pages in acknowledged operations, by kind.", ["kind"], registry=r)
        self.rejected = Counter("balloon_guest_rejected_pages_total",
                                "Pages the host reported as rejected in its ACKs.", ["kind"], registry=r)
        for kind in KINDS:
            self.batches.labels(kind)
            self.pages.labels(kind)
            self.rejected.labels(kind)
        self.ack_latency = Histogram("balloon_guest_ack_latency_seconds",
                                     "Time from sending a batch to its ACK.", buckets=ACK_BUCKETS, registry=r)
        self.window_stall = Counter("balloon_guest_window_stall_seconds",
                                    "Time spent with work ready but the window full (reporting waits).", registry=r)
        self.reconnects = Counter("balloon_guest_reconnects",
                                  "Sessions started again after a lost connection.", registry=r)
        self.connect_failures = Counter("balloon_guest_connect_failures",
                                        "Connection attempts that failed (before a session started).", registry=r)
        self.canary_failures = Counter("balloon_guest_canary_failures",
                                       "Pages owned by the guest whose canary was gone (data lost).", registry=r)
        self.canary_checked = Counter("balloon_guest_canary_pages_checked",
                                      "Pages whose canary was checked (on free and by the sampling sweep).", registry=r)
        self.oom_deflates = Counter("balloon_guest_oom_deflates",
                                    "Times the guest deflated the balloon by itself (deflate-on-oom).", registry=r)
        self.alloc_failures = Counter("balloon_guest_workload_alloc_failures",
                                      "Workload allocations the allocator could not satisfy.", registry=r)
        self.protocol_errors = Counter("balloon_guest_protocol_errors", "Protocol errors, by code.",
                                       ["code"], registry=r)
        self._state: Callable[[], dict] | None = None
        r.register(_StateCollector(self))
        register_standard(r)

    def bind(self, state: Callable[[], dict]) -> None:
        """Give the collector a function returning the agent's current gauges."""
        self._state = state

    def value(self, name: str, labels: dict | None = None) -> float:
        """A sample's current value (for tests and the demo's status line)."""
        result = self.registry.get_sample_value(name, labels or {})
        return 0.0 if result is None else result


GAUGES = {
    "memory_bytes": "Guest RAM size.",
    "free_bytes": "Pages free in the allocator (reported or not; isolated pages excluded).",
    "reported_bytes": "Free pages reported to the host and not reused since (the host must converge to this).",
    "isolated_bytes": "Pages isolated in reports awaiting their ACK.",
    "inflated_bytes": "Pages held by the balloon.",
    "target_bytes": "Balloon size the host asked for (TARGET).",
    "possibly_reclaimable_bytes": "procfs source: free kernel pages seen by the last scan (hints, never isolated).",
    "hinted_bytes": "Pages hinted for the current hint command (possibly reclaimable, not reclaimed).",
    "inflight_batches": "Batches sent and not yet acknowledged.",
    "inflight_batches_max": "Most batches ever in flight at once (never above the window).",
    "window_size": "The window the host granted (0 when disconnected).",
    "connected": "1 while a session is established.",
}

#: metric suffix -> the agent state key it reads, where the two differ
STATE_KEYS = {"target_bytes": "balloon_target_bytes"}
#: old metric suffix -> its replacement (both exported for one release)
DEPRECATED = {"balloon_target_bytes": "target_bytes"}


class _StateCollector:
    def __init__(self, metrics: GuestMetrics) -> None:
        self.metrics = metrics

    def describe(self):
        return [GaugeMetricFamily(f"balloon_guest_{name}", doc) for name, doc in self._gauges()]

    def collect(self):
        state = self.metrics._state() if self.metrics._state else {}
        for name, doc in self._gauges():
            current = DEPRECATED.get(name, name)
            key = STATE_KEYS.get(current, current)
            yield GaugeMetricFamily(f"balloon_guest_{name}", doc, value=float(state.get(key, 0)))

    @staticmethod
    def _gauges():
        yield from GAUGES.items()
        for old, new in DEPRECATED.items():
            yield old, f"DEPRECATED: use balloon_guest_{new}. {GAUGES[new]}"


async def start_http(metrics: GuestMetrics, host: str, port: int,
                     healthy: Callable[[], bool] = lambda: True) -> HttpServer:
    """Serve /metrics and /healthz; the server's ``port`` is the bound one, ``close()`` stops it."""

    def metrics_page() -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry)

    def healthz() -> tuple[int, str, bytes]:
        return (200, "text/plain", b"ok") if healthy() else (503, "text/plain", b"unhealthy")

    return await httpd.start({"/metrics": metrics_page, "/healthz": healthz}, host, port)
