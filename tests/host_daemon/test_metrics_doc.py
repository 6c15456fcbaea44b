"""docs/API.md is the contract for metric names: every balloon_* family either daemon exports is
in its table, and every name in the tables is exported (deprecated aliases included)."""

from __future__ import annotations

import re
from pathlib import Path

from hostkit import RawGuest, scrape

from guest_agent.metrics import GuestMetrics

API = Path(__file__).resolve().parents[2] / "docs" / "API.md"
#: documented as appearing only from the policy's first tick on (docs/API.md says so)
AFTER_FIRST_TICK = {"balloon_host_memory_available_bytes", "balloon_host_memory_total_bytes",
                    "balloon_host_memory_pressure_ratio"}


def _section(title: str) -> str:
    return API.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _documented(*titles: str) -> set[str]:
    names = set()
    for title in titles:
        table = _section(title).split("\n### ", 1)[0]  # not the deprecated names below it
        for row in re.findall(r"^\| (`[^|]*) \|", table, flags=re.MULTILINE):
            names |= {name.split("{")[0] for name in re.findall(r"`([a-z_]+(?:\{[a-z]+\})?)`", row)}
    return {name for name in names if name.startswith("balloon_")}


def _deprecated(side: str) -> set[str]:
    rows = re.findall(r"^\| `([a-z_]+)(?:\{[a-z]+\})?` \((host|guest)\) \|", _section("On both daemons"),
                      flags=re.MULTILINE)
    return {name for name, where in rows if where == side}


def _exported(text: str) -> set[str]:
    return {name for name in re.findall(r"^# TYPE (\S+) ", text, flags=re.MULTILINE) if name.startswith("balloon_")}


async def test_every_host_metric_is_documented_and_every_documented_one_exported(make_host):
    host = await make_host()
    guest = await RawGuest.connect(host.unix)
    await guest.hello("doc", 1024, features=("stats",))
    exported = _exported(await scrape(host.url))
    documented = _documented("Host metrics", "On both daemons") | _deprecated("host")
    assert exported - documented == set(), "exported but not in docs/API.md"
    assert documented - exported - AFTER_FIRST_TICK == set(), "in docs/API.md but not exported"
    await guest.close()


def test_every_guest_metric_is_documented_and_every_documented_one_exported():
    metrics = GuestMetrics()
    metrics.bind(dict)
    exported = _exported(metrics.render().decode())  # the guest writes its own page (no prometheus_client)
    documented = _documented("Guest metrics", "On both daemons") | _deprecated("guest")
    assert exported - documented == set(), "exported but not in docs/API.md"
    assert documented - exported == set(), "in docs/API.md but not exported"
