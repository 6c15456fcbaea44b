"""What the host exports besides its own series: build info and the process collectors.

The guest writes the same series without prometheus_client (guest_agent/metrics.py says
why). The host uses a private ``CollectorRegistry`` (several can live in one test process), so
the collectors prometheus_client puts on its global registry — ``process_*`` (from
/proc/self), ``python_info``, ``python_gc_*`` — are registered here explicitly, with
``balloon_build_info{version}`` (value 1: the usual ``*_build_info`` join target, as in
``prometheus_build_info``).
"""

from __future__ import annotations

from importlib import metadata

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)

DISTRIBUTION = "balloon-hints"


def version() -> str:
    """The installed distribution's version ("unknown" when run from an uninstalled tree)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def register_standard(registry: CollectorRegistry) -> None:
    """Add build info, ``process_*``, ``python_info`` and ``python_gc_*`` to ``registry``."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)  # registers itself only where gc.get_stats() exists
    info = Gauge("balloon_build_info", "Always 1; the version label says which build is running.",
                 ["version"], registry=registry)
    info.labels(version()).set(1)
