"""Prometheus metrics of the host, computed at scrape time by one custom collector.

Per-guest values are read from the registry's records when /metrics is scraped, so a
forgotten guest's series simply stop existing (no stale series, no label leak), and the
per-batch path only bumps plain integers. Each host has its own ``CollectorRegistry``
(never the global one), so tests can run several hosts in one process.

Names follow docs/API.md: ``balloon_*``, base units, ``_total``/``_bytes``/``_seconds``.
``DEPRECATED`` lists old names still exported for one release beside their replacement
(same value, HELP text saying so); docs/API.md names the release that drops them.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from shared.errors import CODES
from shared.vocabulary import PAGE_SIZE

from .guest_session import RESULTS
from .registry import STAT_AVAILABLE, STAT_FREE, STAT_TOTAL
from .standard_metrics import register_standard
from .tracker import KINDS
from .vmm import INHIBIT_REASONS

#: old name -> its replacement; both are exported through the 0.2 releases, the old one goes in 0.3.
DEPRECATED = {"balloon_balloon_target_bytes": "balloon_target_bytes"}


class HostStats:
    """Host-wide counters that outlive any guest record."""

    def __init__(self) -> None:
        self.sessions: dict[str, int] = dict.fromkeys(RESULTS, 0)
        self.protocol_errors: dict[str, int] = dict.fromkeys(CODES, 0)


class HostCollector(Collector):
    def __init__(self, host) -> None:
        self.host = host

    def describe(self):
        return []  # values are dynamic; registering must not call collect()

    def collect(self):
        host = self.host
        stats: HostStats = host.stats
        records = list(host.registry.guests.values())

        connected = GaugeMetricFamily("balloon_guests_connected", "Guests with a live session.")
        connected.add_metric([], sum(1 for r in records if r.connection is not None))
        yield connected
        known = GaugeMetricFamily("balloon_guests_known", "Guests known: connected or retained after disconnect.")
        known.add_metric([], len(records))
        yield known

        sessions = CounterMetricFamily("balloon_sessions_total", "Sessions ended, by result.", labels=["result"])
        for result, count in stats.sessions.items():
            sessions.add_metric([result], count)
        yield sessions
        errors = CounterMetricFamily("balloon_protocol_errors_total",
                                     "ERROR messages the host sent, by code.", labels=["code"])
        for code, count in stats.protocol_errors.items():
            errors.add_metric([code], count)
        yield errors

        families = {
            "batches": CounterMetricFamily("balloon_batches_total", "Batches applied and acked.", labels=["guest", "kind"]),
            "ranges": CounterMetricFamily("balloon_ranges_total", "Ranges received in batches.", labels=["guest", "kind"]),
            "pages": CounterMetricFamily("balloon_pages_total", "Pages claimed by batches.", labels=["guest", "kind"]),
        }
        rejected = CounterMetricFamily("balloon_rejected_pages_total",
                                       "Pages of batches skipped as invalid, by reason.", labels=["guest", "reason"])
        received = CounterMetricFamily("balloon_received_bytes_total", "Bytes received from the guest.", labels=["guest"])
        up = GaugeMetricFamily("balloon_guest_up", "1 while the guest has a live session, 0 while retained.", labels=["guest"])
        memory = GaugeMetricFamily("balloon_guest_memory_bytes", "Guest RAM size from HELLO.", labels=["guest"])
        reported = GaugeMetricFamily("balloon_reported_bytes", "Pages currently reported free, in bytes.", labels=["guest"])
        inflated = GaugeMetricFamily("balloon_inflated_bytes", "Pages currently in the balloon, in bytes.", labels=["guest"])
        hinted = GaugeMetricFamily("balloon_hinted_bytes",
                                   "Pages hinted for the current hinting command (possibly reclaimable).", labels=["guest"])
        target = GaugeMetricFamily("balloon_target_bytes", "Balloon size the host asked for (0: none).", labels=["guest"])
        inflight = GaugeMetricFamily("balloon_inflight_batches", "Batches received and not yet acked.", labels=["guest"])
        reclaimed = GaugeMetricFamily("balloon_reclaimed_bytes",
                                      "RAM file size minus its allocated blocks, read from the kernel.", labels=["guest"])
        resident = GaugeMetricFamily("balloon_resident_bytes", "Allocated blocks of the RAM file (st_blocks).", labels=["guest"])
        discard = {  # proof of reclaim (reclaim.py): asked vs what the kernel gave back
            "requested_bytes": CounterMetricFamily("balloon_discard_requested_bytes_total",
                                                   "Bytes the host asked the kernel to discard.", labels=["guest"]),
            "released_bytes": CounterMetricFamily("balloon_discard_released_bytes_total",
                                                  "Bytes discards really released (st_blocks before - after).",
                                                  labels=["guest"]),
            "unreleased_bytes": CounterMetricFamily("balloon_discard_unreleased_bytes_total",
                                                    "Bytes still holding data after a discard (SEEK_DATA): "
                                                    "discards that did not work.", labels=["guest"]),
            "ineffective_discards": CounterMetricFamily("balloon_discard_ineffective_total",
                                                        "Discards that left data they should have freed.",
                                                        labels=["guest"]),
        }
        for r in records:
            g = r.id
            for code, kind in enumerate(KINDS):
                families["batches"].add_metric([g, kind], r.batches[code])
                families["ranges"].add_metric([g, kind], r.ranges[code])
                families["pages"].add_metric([g, kind], r.pages_total[code])
            for reason, count in r.rejected.items():
                rejected.add_metric([g, reason], count)
            received.add_metric([g], r.received_bytes)
            session = r.connection
            up.add_metric([g], 1 if session is not None else 0)
            memory.add_metric([g], r.pages * PAGE_SIZE)
            tracker = r.tracker
            reported.add_metric([g], tracker.reported_pages * PAGE_SIZE)
            inflated.add_metric([g], r.balloon_pages * PAGE_SIZE)
            hinted.add_metric([g], tracker.hinted_pages * PAGE_SIZE)
            target.add_metric([g], (r.target_pages or 0) * PAGE_SIZE)
            window = session.window_state() if session is not None else None
            inflight.add_metric([g], window[1] if window else 0)
            if r.ram is not None:
                for name, family in discard.items():
                    family.add_metric([g], getattr(r.ram, name))
                try:
                    reclaimed.add_metric([g], r.ram.reclaimed_bytes())
                    resident.add_metric([g], r.ram.resident_bytes())
                except OSError:
                    pass
        yield from families.values()
        yield from (rejected, received, up, memory, reported, inflated, hinted, target, inflight,
                    reclaimed, resident)
        yield from deprecated_aliases((target,))
        yield from vmm_vocabulary(records, time.monotonic())
        yield from discard.values()
        yield from vmm_families(records)
        policy = getattr(host, "policy", None)
        if policy is not None:
            yield from policy.collect()

        apply = host.registry.apply_histogram()
        histogram = HistogramMetricFamily("balloon_batch_apply_seconds",
                                          "Time to apply one batch (tracker and RAM-file "
                                          "discard) until its ACK is ready.")
        histogram.add_metric([], apply.cumulative(), apply.sum)
        yield histogram


def vmm_vocabulary(records, now: float):
    """Per guest, the figures dashboards built for libvirt/KubeVirt already chart, under their
    names (``libvirt_domain_memory_stats_actual_balloon_bytes``, ``kubevirt_vmi_memory_usable_bytes``
    ...) with our prefix: actual = RAM − balloon (QEMU's ``info balloon``), and the guest's own
    STATS (virtio MEMTOT/AVAIL/MEMFREE), absent until the guest sent that tag."""
    actual = GaugeMetricFamily("balloon_guest_actual_balloon_bytes",
                               "Memory the guest keeps: RAM minus balloon (libvirt's actual_balloon).", labels=["guest"])
    stats = {
        STAT_TOTAL: GaugeMetricFamily("balloon_guest_available_bytes",
                                      "Memory the guest's OS can use, from its last STATS (virtio MEMTOT).", labels=["guest"]),
        STAT_AVAILABLE: GaugeMetricFamily("balloon_guest_usable_bytes",
                                          "Memory the guest could still allocate, from its last STATS (virtio AVAIL).",
                                          labels=["guest"]),
        STAT_FREE: GaugeMetricFamily("balloon_guest_unused_bytes",
                                     "Memory unused by the guest, from its last STATS (virtio MEMFREE).", labels=["guest"]),
    }
    age = GaugeMetricFamily("balloon_guest_stats_age_seconds", "Seconds since the guest's last STATS.", labels=["guest"])
    unreachable = GaugeMetricFamily("balloon_guest_target_unreachable",
                                    "1 while the balloon is short of its target and stopped moving (see target_state).",
                                    labels=["guest"])
    shortfall = GaugeMetricFamily("balloon_target_shortfall_bytes",
                                  "Distance between the balloon and its target (0: reached or none).", labels=["guest"])
    for r in records:
        g = r.id
        actual.add_metric([g], r.actual_pages * PAGE_SIZE)
        for tag, family in stats.items():
            if tag in r.stats:
                family.add_metric([g], r.stats[tag])
        if r.stats_at is not None:
            age.add_metric([g], max(0.0, now - r.stats_at))
        unreachable.add_metric([g], 1 if r.target_state(now) == "unreachable" else 0)
        shortfall.add_metric([g], (r.target_shortfall_pages or 0) * PAGE_SIZE)
    yield from (actual, *stats.values(), age, unreachable, shortfall)


def vmm_families(records):
    """The VMM interlock (host_daemon/vmm/): pages left unpunched because discards were unsafe,
    and whether each VM's VMM answers. Only guests the inventory gives a VMM (``qmp``) appear."""
    inhibited = CounterMetricFamily("balloon_discard_inhibited_bytes_total",
                                    "Bytes the host did not discard because the VMM said discards were "
                                    "unsafe (migration, snapshot, pinned RAM, VMM unreachable).",
                                    labels=["guest", "reason"])
    up = GaugeMetricFamily("balloon_vmm_up", "1 while the guest's VMM answers (QMP), 0 otherwise.", labels=["guest"])
    blocked = GaugeMetricFamily("balloon_vmm_discard_blocked",
                                "1 while the VMM's interlocks block discards of the guest's RAM.", labels=["guest"])
    for r in records:
        if r.vmm is None:
            continue
        for reason in INHIBIT_REASONS:
            inhibited.add_metric([r.id, reason], r.inhibited.get(reason, 0))
        up.add_metric([r.id], 1 if r.vmm.state == "connected" else 0)
        blocked.add_metric([r.id], 0 if r.discard_block() is None else 1)
    yield from (inhibited, up, blocked)


def deprecated_aliases(families):
    """The same per-guest samples under each family's old name (``DEPRECATED``)."""
    old_names = {new: old for old, new in DEPRECATED.items()}
    for family in families:
        alias = GaugeMetricFamily(old_names[family.name], f"DEPRECATED: use {family.name}. "
                                  f"{family.documentation}", labels=["guest"])
        for sample in family.samples:
            alias.add_metric([sample.labels["guest"]], sample.value)
        yield alias


def make_registry(host) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HostCollector(host))
    register_standard(registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
