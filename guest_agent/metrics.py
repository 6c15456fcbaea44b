"""The guest's own /metrics and /healthz (guest_agent/httpd.py), in the Prometheus text format.

Counters and the ack-latency histogram are updated as things happen; gauges that are
a view of the agent's state (memory, free, reported, isolated, inflated, window) are read
at scrape time, so they can never drift from the allocator.
``balloon_guest_reported_bytes`` is "reported and not reused now": the number the host's
``balloon_reported_bytes{guest}`` must converge to once the guest is quiet. ``DEPRECATED``
names are exported beside their replacement through the 0.2 releases (gone in 0.3).

Why not prometheus_client here (the host uses it): the agent lives in the guest whose memory
it reclaims, and prometheus_client's package import pulls in its push gateway and HTTP
servers — ``ssl``, ``http.server``, ``urllib.request``, ``wsgiref`` — plus
``importlib.metadata`` for the version: ~8 MiB of RSS for some twenty series. What the guest
needs of it is small — counters, one histogram, the text format 0.0.4
(https://prometheus.io/docs/instrumenting/exposition_formats/) and the standard
``process_*``/``python_*`` series with prometheus_client's names and meanings — and
tests/guest_agent/test_metrics.py checks the output with prometheus_client's own parser and
with ``promtool check metrics``. Single-threaded by design: everything runs on the agent's
event loop (the procfs scan thread touches no metric).
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import sys
from collections.abc import Callable, Iterator

from . import httpd
from .batches import KINDS
from .httpd import HttpServer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DISTRIBUTION = "balloon_hints"

log = logging.getLogger("guest_agent.metrics")

#: 10 µs .. 10 s: resolves sub-millisecond acks on a local socket and slow hosts alike.
ACK_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
               0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GuestMetrics:
    """Every metric the agent exports; one instance per agent, in its own registry."""

    def __init__(self) -> None:
        self.registry = Registry()
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
        r.register(self._gauge_families)
        r.register(standard_families)

    def bind(self, state: Callable[[], dict]) -> None:
        """Give the collector a function returning the agent's current gauges."""
        self._state = state

    def value(self, name: str, labels: dict | None = None) -> float:
        """A sample's current value (for tests and the demo's status line)."""
        result = self.registry.get_sample_value(name, labels or {})
        return 0.0 if result is None else result

    def render(self) -> bytes:
        """The /metrics page."""
        return self.registry.render()

    def _gauge_families(self) -> Iterator[Family]:
        state = self._state() if self._state else {}
        for name, doc in _gauges():
            current = DEPRECATED.get(name, name)
            key = STATE_KEYS.get(current, current)
            yield Family(f"balloon_guest_{name}", doc, "gauge", [("", (), float(state.get(key, 0)))])


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


def _gauges():
    yield from GAUGES.items()
    for old, new in DEPRECATED.items():
        yield old, f"DEPRECATED: use balloon_guest_{new}. {GAUGES[new]}"


# -- the few pieces of a Prometheus client the guest needs ------------------------------


class Family:
    """One metric family: its samples as (suffix, label pairs, value)."""

    __slots__ = ("name", "doc", "kind", "samples")

    def __init__(self, name: str, doc: str, kind: str, samples: list[tuple[str, tuple, float]]) -> None:
        self.name, self.doc, self.kind, self.samples = name, doc, kind, samples


class Registry:
    """Callables yielding :class:`Family`; one per agent (several agents live in one test process)."""

    def __init__(self) -> None:
        self._collectors: list[Callable[[], Iterator[Family]]] = []

    def register(self, collect: Callable[[], Iterator[Family]]) -> None:
        self._collectors.append(collect)

    def collect(self) -> Iterator[Family]:
        for collect in self._collectors:
            yield from collect()

    def get_sample_value(self, name: str, labels: dict | None = None) -> float | None:
        want = tuple(sorted((labels or {}).items()))
        for family in self.collect():
            for suffix, pairs, value in family.samples:
                if family.name + suffix == name and tuple(sorted(pairs)) == want:
                    return value
        return None

    def render(self) -> bytes:
        """The text exposition format 0.0.4: HELP, TYPE, then the samples of each family."""
        out = []
        for family in self.collect():
            doc = family.doc.replace("\\", "\\\\").replace("\n", "\\n")
            out.append(f"# HELP {family.name} {doc}\n# TYPE {family.name} {family.kind}\n")
            for suffix, pairs, value in family.samples:
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
                out.append(f"{family.name}{suffix}{{{labels}}} {_number(value)}\n" if labels
                           else f"{family.name}{suffix} {_number(value)}\n")
        return "".join(out).encode()


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    """Go's float formatting, as Prometheus writes ``le`` bounds: +Inf, -Inf, NaN, else repr."""
    value = float(value)
    if value == float("inf"):
        return "+Inf"
    if value == float("-inf"):
        return "-Inf"
    return "NaN" if value != value else repr(value)


class _Child:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class Counter:
    """A counter, with or without labels; exported as ``NAME_total`` (given with or without it)."""

    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...] | list[str] = (), *,
                 registry: Registry) -> None:
        self.name = name.removesuffix("_total")
        self.doc = doc
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _Child] = {}
        if not self.labelnames:
            self._children[()] = _Child()
        registry.register(self._collect)

    def labels(self, *values: str) -> _Child:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels {self.labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = _Child()
        return child

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def _collect(self) -> Iterator[Family]:
        samples = [("", tuple(zip(self.labelnames, key, strict=True)), child.value)
                   for key, child in self._children.items()]
        yield Family(self.name + "_total", self.doc, "counter", samples)


class Histogram:
    """A histogram without labels: cumulative ``_bucket{le}``, ``_count``, ``_sum``."""

    def __init__(self, name: str, doc: str, *, buckets: tuple[float, ...], registry: Registry) -> None:
        self.name = name
        self.doc = doc
        self.bounds = tuple(sorted(float(b) for b in buckets)) + (float("inf"),)
        self._counts = [0] * len(self.bounds)
        self._sum = 0.0
        registry.register(self._collect)

    def observe(self, value: float) -> None:
        self._sum += value
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self._counts[index] += 1
                break

    def _collect(self) -> Iterator[Family]:
        samples, running = [], 0
        for bound, count in zip(self.bounds, self._counts, strict=True):
            running += count
            samples.append(("_bucket", (("le", _number(bound)),), float(running)))
        samples += [("_count", (), float(running)), ("_sum", (), self._sum)]
        yield Family(self.name, self.doc, "histogram", samples)


# -- what every daemon exports (the host gets the same from host_daemon/standard_metrics.py) ----


def version() -> str:
    """The installed distribution's version from its ``.dist-info/METADATA`` "Version:" line
    (what ``importlib.metadata.version`` answers, without its 2.6 MiB of imports); "unknown"
    from an uninstalled tree."""
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.startswith(DISTRIBUTION + "-") and name.endswith(".dist-info"):
                try:
                    with open(os.path.join(entry or ".", name, "METADATA"), encoding="utf-8") as metadata:
                        for line in metadata:
                            if line.startswith("Version:"):
                                return line.split(":", 1)[1].strip()
                            if not line.strip():
                                break
                except OSError:
                    continue
    return "unknown"


def _boot_time() -> float:
    with open("/proc/stat", "rb") as stat:
        for line in stat:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    return 0.0


class _Standard:
    """``process_*`` (from /proc/self, as prometheus_client's ProcessCollector), ``python_info``,
    ``python_gc_*`` (its PlatformCollector and GCCollector) and ``balloon_build_info``."""

    def __init__(self) -> None:
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.page = os.sysconf("SC_PAGE_SIZE")
        try:
            self.btime = _boot_time()
        except OSError:
            self.btime = 0.0
        self.version = version()
        info = platform.python_version_tuple()
        self.python = (("implementation", platform.python_implementation()), ("major", info[0]),
                       ("minor", info[1]), ("patchlevel", info[2]), ("version", platform.python_version()))

    def __call__(self) -> Iterator[Family]:
        try:
            with open("/proc/self/stat", "rb") as stat:
                parts = stat.read().rsplit(b")", 1)[-1].split()
        except OSError:
            parts = None
        if parts is not None and self.btime:
            yield Family("process_virtual_memory_bytes", "Virtual memory size in bytes.", "gauge",
                         [("", (), float(parts[20]))])
            yield Family("process_resident_memory_bytes", "Resident memory size in bytes.", "gauge",
                         [("", (), float(parts[21]) * self.page)])
            yield Family("process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
                         "gauge", [("", (), float(parts[19]) / self.ticks + self.btime)])
            yield Family("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
                         "counter", [("", (), (float(parts[11]) + float(parts[12])) / self.ticks)])
        try:
            fds = len(os.listdir("/proc/self/fd"))
            with open("/proc/self/limits", "rb") as limits:
                max_fds = next(float(line.split()[3]) for line in limits if line.startswith(b"Max open file"))
        except (OSError, StopIteration, ValueError):
            pass
        else:
            yield Family("process_open_fds", "Number of open file descriptors.", "gauge", [("", (), float(fds))])
            yield Family("process_max_fds", "Maximum number of open file descriptors.", "gauge",
                         [("", (), max_fds)])
        yield Family("python_info", "Python platform information", "gauge", [("", self.python, 1.0)])
        stats = gc.get_stats()
        for key, name, doc in (("collected", "objects_collected", "Objects collected during gc"),
                               ("uncollectable", "objects_uncollectable", "Uncollectable objects found during GC"),
                               ("collections", "collections", "Number of times this generation was collected")):
            yield Family(f"python_gc_{name}_total", doc, "counter",
                         [("", (("generation", str(gen)),), float(stat[key]))
                          for gen, stat in enumerate(stats)])
        yield Family("balloon_build_info", "Always 1; the version label says which build is running.", "gauge",
                     [("", (("version", self.version),), 1.0)])


_standard: _Standard | None = None


def standard_families() -> Iterator[Family]:
    global _standard
    if _standard is None:
        _standard = _Standard()
    yield from _standard()


async def start_http(metrics: GuestMetrics, host: str, port: int,
                     healthy: Callable[[], bool] = lambda: True) -> HttpServer:
    """Serve /metrics and /healthz; the server's ``port`` is the bound one, ``close()`` stops it."""

    def metrics_page() -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE, metrics.render()

    def healthz() -> tuple[int, str, bytes]:
        return (200, "text/plain", b"ok") if healthy() else (503, "text/plain", b"unhealthy")

    return await httpd.start({"/metrics": metrics_page, "/healthz": healthz}, host, port)
